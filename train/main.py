"""Train one method on one process, several, or several nodes.

    torchrun --standalone --nproc_per_node=N train/main.py --preset demo [--data DIR] [--out DIR]
        [--device auto|cpu|cuda] [--steps N] [--resume RUN/ckpt/last.pt|auto] [--section.field=value ...]

Also runs as `python train/main.py ...` (one process, no process group). `--help` lists every config
field and preset (train/cli.py). A user-fixable problem on any rank is one `error: [rank R] ...` line
from that rank and the job ends at once; exit codes: 0 done, 1 the run failed, 2 usage or data
error, 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written; rerun with --resume auto).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/main.py` from anywhere

import torch.distributed as dist

from pipeline.errors import ConfigError, DataError, UserError, one_line
from train.cli import parse_config
from train.compile import wrap_compiled
from train.config import Config
from train.distributed import Env, init_distributed, unwrap, watch_parent
from train.loop import Preempted, PreemptionFlag, run_dir_of, seed_all, set_cpu_threads, train
from train.optim import build_optimizer
from train.runlog import lock_run_folder
from train.schedules import build_scheduler

__all__ = ["build", "main", "parse_config", "resolve_data"]


def resolve_data(cfg: Config, env: Env) -> None:
    """Rank 0 finds (or, for the demo, converts) the shards first; the others then use its path."""
    from pipeline import resolve_data_dir

    error = None
    if env.main:
        try:
            cfg.data.dir = str(resolve_data_dir(cfg.data))
        except (
            FileNotFoundError,
            DataError,
        ) as err:  # pipeline's missing-folder error is a FileNotFoundError
            error = str(err)
    if env.world_size > 1:
        box = [error, cfg.data.dir]
        dist.broadcast_object_list(box, src=0)
        error, cfg.data.dir = box
    if error:
        raise DataError(error)


def build(cfg: Config, env: Env):
    """-> (model, optimizer, scheduler, loader); model is DDP-wrapped when there are several ranks."""
    from model import build_method
    from pipeline import build_loader

    if cfg.data.batch_size % env.world_size:
        raise ConfigError(
            f"--data.batch_size={cfg.data.batch_size} is not divisible by the {env.world_size} "
            "ranks (it is the global batch)"
        )
    loader = build_loader(cfg.data, env.rank, env.world_size, env.device)
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg.model, cfg.data).to(env.device)
    amp = env.device.type == "cuda" and cfg.run.amp == "bf16"
    # DDP or FSDP (cfg.dist), compiled per run.compile
    model = wrap_compiled(method, cfg.dist, cfg.run.compile, env.device, env.world_size, amp=amp)
    optimizer = build_optimizer(cfg.optim, unwrap(model), cfg.data.batch_size, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.data.batch_size, len(loader))
    return model, optimizer, scheduler, loader


def main(argv: list[str]) -> int:
    # First of all: a preemption signal during start-up exits 75 at once, not -15 (requeue wrappers).
    with PreemptionFlag(at_once=True) as preemption, contextlib.ExitStack() as held:
        return _main(argv, preemption, held)


def _main(argv: list[str], preemption: PreemptionFlag, held: contextlib.ExitStack) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()
    try:
        cfg = parse_config(argv)
        env = init_distributed(cfg.run.device, cfg.preset)
        held.enter_context(lock_run_folder(run_dir_of(cfg), env))  # one training per run folder
        set_cpu_threads(cfg, env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        resolve_data(cfg, env)
        model, optimizer, scheduler, loader = build(cfg, env)
        run_dir = train(cfg, model, optimizer, scheduler, loader, env, preemption=preemption)
    except Preempted as stop:
        print(f"preempted: {where}{stop}", file=sys.stderr, flush=True)
        code = stop.exit_code
    except UserError as err:
        # Under torchrun another rank's progress bar may hold the terminal's line: start a new one.
        lead = "\n" if world > 1 else ""
        print(lead + one_line(err).replace("error: ", f"error: {where}", 1), file=sys.stderr, flush=True)
        if world > 1:
            # Leave now: a clean shutdown would wait for loader workers and for peers that sit in a
            # collective; the closed connections end their collectives, torchrun stops the rest.
            os._exit(err.exit_code)
        return err.exit_code
    else:
        code = 0
        if env.main:
            recon = run_dir / "recon.png"
            print(
                f"run: {run_dir}  checkpoint: {run_dir / 'ckpt' / 'last.pt'}"
                + (f"  reconstructions: {recon}" if recon.exists() else ""),
                flush=True,
            )
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
