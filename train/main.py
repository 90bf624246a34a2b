"""Train one method on one process, several, or several nodes.

    torchrun --standalone --nproc_per_node=N train/main.py --preset demo [--data DIR] [--out DIR]
        [--device auto|cpu|cuda] [--steps N] [--resume RUN/ckpt/last.pt] [--section.field=value ...]

Also runs as `python train/main.py ...` (one process, no process group). The short flags are
aliases of config keys (--data = --data.dir, --out = --run.out, --device = --run.device,
--steps = --run.steps, --resume = --run.resume). With --resume the saved config is the base and the
command line overrides it, so `--resume RUN/ckpt/last.pt` alone finishes the run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/main.py` from anywhere

import torch
import torch.distributed as dist

from pipeline.errors import UserError
from train.config import Config, ConfigError, apply_overrides, from_dict, load_config
from train.loop import Env, NonFiniteLoss, build_optimizer, build_scheduler, seed_all, set_cpu_threads, train

SHORT_FLAGS = {"data": "data.dir", "out": "run.out", "device": "run.device", "steps": "run.steps",
               "resume": "run.resume"}


def parse_config(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="named preset (default: demo)")
    for flag, key in SHORT_FLAGS.items():
        parser.add_argument(f"--{flag}", default=None, help=f"same as --{key}")
    args, overrides = parser.parse_known_args(argv)
    overrides += [f"--{key}={getattr(args, flag)}" for flag, key in SHORT_FLAGS.items()
                  if getattr(args, flag) is not None]
    if not args.resume:
        return load_config(args.preset or "demo", overrides)
    if not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    cfg = from_dict(torch.load(args.resume, map_location="cpu", mmap=True, weights_only=False)["config"])
    if args.preset and args.preset != cfg.preset:
        raise ConfigError(f"--preset {args.preset} does not match the checkpoint's preset {cfg.preset}")
    cfg.run.steps = 0  # the saved stop step does not carry over; pass --steps again to stop early
    return apply_overrides(cfg, overrides)


def init_distributed(choice: str, preset: str = "") -> Env:
    """Process group from torchrun's environment (NCCL on GPUs, Gloo on CPUs); none for plain python."""
    if choice == "cuda" and not torch.cuda.is_available():
        why = f" (preset {preset} runs on GPUs)" if preset else ""
        raise ConfigError(f"--device cuda was asked for{why} but no CUDA GPU is visible; use --device cpu or "
                          "auto to run on the CPU anyway")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if choice != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Env(rank=rank, world_size=world, device=device)


def resolve_data(cfg: Config, env: Env) -> None:
    """Rank 0 finds (or, for the demo, converts) the shards first; the others then use its path."""
    from pipeline import resolve_data_dir

    error = None
    if env.main:
        try:
            cfg.data.dir = str(resolve_data_dir(cfg.data))
        except FileNotFoundError as err:
            error = str(err)
    if env.world_size > 1:
        box = [error, cfg.data.dir]
        dist.broadcast_object_list(box, src=0)
        error, cfg.data.dir = box
    if error:
        raise FileNotFoundError(error)


def build(cfg: Config, env: Env):
    """-> (model, optimizer, scheduler, loader); model is DDP-wrapped when there are several ranks."""
    from model import build_method
    from pipeline import build_loader

    loader = build_loader(cfg.data, env.rank, env.world_size, env.device)
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg.model, cfg.data).to(env.device)
    model = method
    if env.world_size > 1:
        ids = None
        if env.device.type == "cuda":
            # Global-batch BatchNorm statistics in the expander, as VICReg trains (GPU-only in torch).
            method, ids = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method), [env.device.index]
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=ids)
    optimizer = build_optimizer(cfg.optim, method, cfg.data.batch_size, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.data.batch_size, len(loader))
    return model, optimizer, scheduler, loader


def main(argv: list[str]) -> int:
    env = None
    try:
        cfg = parse_config(argv)
        env = init_distributed(cfg.run.device, cfg.preset)
        set_cpu_threads(cfg, env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        resolve_data(cfg, env)
        model, optimizer, scheduler, loader = build(cfg, env)
        run_dir = train(cfg, model, optimizer, scheduler, loader, env)
        if env.main:
            recon = run_dir / "recon.png"
            print(f"run: {run_dir}  checkpoint: {run_dir / 'ckpt' / 'last.pt'}" +
                  (f"  reconstructions: {recon}" if recon.exists() else ""), flush=True)
        return 0
    except (UserError, ValueError, FileNotFoundError) as err:
        # ConfigError is a ValueError: every user-fixable problem ends as one line, not a traceback.
        if env is None or env.main:
            print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 1 if isinstance(err, NonFiniteLoss) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
