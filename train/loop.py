"""The training loop: one DDP step, checkpoint orchestration, preemption, logging and the recon grid
(the optimizer is built by train/optim.py, every schedule by train/schedules.py).

`train(cfg, model, optimizer, scheduler, loader, env)` runs the schedule the config defines, from
step 0 or from `cfg.run.resume`, and stops after `cfg.run.steps` if set. `train_step` is one
optimizer step and is what `bench/step.py` times. Rank 0 writes the run folder:

    config.json    resolved config; provenance: git SHA, device and its name, library versions,
                   which kernel path ran ("triton" | "ref") and auto mode's per-shape choices, world size
                   (train/runlog.py writes it, metrics.jsonl and the recon grid)
    metrics.jsonl  every `run.log_every` steps: step, epoch, lr, every loss term, grad norm, times, images/s
    ckpt/          step-NNNNNN.pt and last.pt -> the newest one (train/checkpoint.py)
    recon.png      view 1 | view 2 | targets | predictions | |prediction - target| (also recon/step-NNNNNN.png)
    tensorboard/   the same scalars and the recon grid, with run.tensorboard=true
    .train.lock    held by the training that writes the folder (train/main.py): a second one is refused

SIGTERM or SIGUSR1 (a cluster's preemption notice) on any rank: every rank finishes the same step,
the checkpoint is written, and train() raises Preempted; the process exits with PREEMPTED_EXIT.
During start-up (train/main.py, before train()) the same signals exit with PREEMPTED_EXIT at once.
torchrun's agent forwards SIGTERM to its workers (and kills them 30 s later); SIGUSR1 kills the agent
itself, so under torchrun it must be sent to the workers only.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.diagnostics import diagnostics
from pipeline.errors import CheckpointError, ConfigError, TrainingError
from train import checkpoint
from train.config import Config, to_dict
from train.distributed import (
    Env,
    clip_grad_norm,
    gathered,
    is_sharded,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
    unwrap,
)
from train.provenance import git_sha
from train.runlog import RunLog, save_recon_grid, writing
from train.schedules import Schedules, peak_lr, total_steps, warmup_steps


class NonFiniteLoss(TrainingError):
    """A loss term or the gradient norm became NaN/inf; the message names the step and the term."""


def set_cpu_threads(cfg: Config, device: torch.device, ranks_per_node: int = 1) -> int:
    """Size torch's CPU thread pool. On a CPU device the default (one thread per core) competes with
    the data workers and the other ranks for the same cores, and oversubscribed OpenMP threads spin:
    a demo step measured 4x slower with 2 threads than with 1 on 2 busy cores. Auto leaves a core per
    data worker; an explicit run.threads or OMP_NUM_THREADS wins."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // ranks_per_node - cfg.data.workers))
    return torch.get_num_threads()


# --- one step -------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    step: int,
    clip_grad: float = 0.0,
    amp: bool = False,
    mark: Callable[[str], None] | None = None,
    schedules: Schedules | None = None,
) -> dict[str, float]:
    """Forward, backward, clip, optimizer and scheduler step; returns the loss terms averaged over
    ranks plus the grad norm. Raises NonFiniteLoss (before touching the weights) on NaN/inf.
    `mark(phase)` is called after "forward", "backward" and "optimizer" (bench/step.py times them).
    `schedules` sets the step's weight decay and λ before the forward, gives the forward its teacher
    temperatures and updates the teacher after the optimizer step (train/schedules.py)."""
    args = {}
    if schedules is not None:
        schedules.before_step(unwrap(model), optimizer, step)
        args = schedules.forward_args(unwrap(model), step)
    with torch.autocast(batch.view1.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch, **args)
    names = sorted(k for k in out if k.startswith("loss"))
    # One small all-reduce of every term, overlapped with backward; read after it (one host sync).
    terms = torch.stack([out[k].detach().float() for k in names])
    pending = dist.all_reduce(terms, async_op=True) if dist.is_initialized() else None
    if mark:
        mark("forward")
    out["loss"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = clip_grad_norm(params, clip_grad)  # 0 = measure only; a plain tensor under FSDP too
    if pending:
        pending.wait()
        terms /= dist.get_world_size()
    if mark:
        mark("backward")
    values = torch.cat([terms, norm.detach().float().reshape(1).to(terms.device)]).tolist()
    result = dict(zip(names + ["grad_norm"], values))
    bad = [k for k in names + ["grad_norm"] if not math.isfinite(result[k])]
    if bad:
        # Name the specific term rather than the total it poisons.
        term = next((k for k in bad if k != "loss"), bad[0])
        raise NonFiniteLoss(
            f"non-finite {term} = {result[term]} at step {step + 1} "
            f"({', '.join(f'{k}={result[k]:.4g}' for k in names)}); "
            "lower --optim.base_lr or check the data"
        )
    if schedules is not None:
        schedules.before_optimizer(unwrap(model), step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if schedules is not None:
        schedules.after_step(unwrap(model), step)
        result.update(schedules.logged(unwrap(model), step))
    if mark:
        mark("optimizer")
    return result


# --- checkpoints ----------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather(obj, env: Env) -> list:
    """Every rank's obj, in rank order (on every rank)."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    optimizer,
    scheduler,
    loader,
    step: int,
    epoch: int,
    env: Env,
    schedules: Schedules | None = None,
) -> Path | None:
    """Collective (every rank calls it); rank 0 writes ckpt/step-NNNNNN.pt (train/checkpoint.py).

    Rank 0's outcome is broadcast, so a write that fails (full disk) stops every rank at this step
    with rank 0's error instead of leaving the others waiting in the next step's collective."""
    rngs, positions = gather(checkpoint.rng_state(), env), gather(loader.state_dict(), env)
    # Collectives: full tensors on rank 0's CPU, the same keys under one process, DDP and FSDP.
    model_state, optimizer_state = model_state_dict(model), optimizer_state_dict(model, optimizer)
    path, error = None, None
    if env.main:
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "rng": rngs,
            "loader": positions,
            "schedules": schedules.state_dict() if schedules is not None else {},  # the adapted λ
            "world_size": env.world_size,
            "config": to_dict(cfg),
            "run_dir": str(run_dir.resolve()),
            "git_sha": git_sha(),
        }
        try:
            path = checkpoint.save(run_dir / "ckpt", state, step, cfg.run.keep_ckpts)
        except CheckpointError as err:
            error = err
    if env.world_size > 1:
        box = [str(error) if error else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] and error is None:
            raise CheckpointError(f"rank 0 could not save the checkpoint: {box[0]}")
    if error is not None:
        raise error
    return path


def restore(
    state: dict,
    path: str | Path,
    model: nn.Module,
    optimizer,
    scheduler,
    loader,
    env: Env,
    schedules: Schedules,
) -> tuple[int, int]:
    """Put a checkpoint read by checkpoint.read back into place; returns (step, epoch).
    Everything is checked (ranks, architecture, optimizer groups) before anything is changed.
    The optimizer settings are this command's config (its --optim.* overrides, as DINOv2 recomputes
    its schedules from the config), applied after the checkpoint's moments and step; one line names
    the overrides."""
    if state["world_size"] != env.world_size:
        raise CheckpointError(
            f"--resume {path} was written by {state['world_size']} ranks but this run has "
            f"{env.world_size}: resume with --nproc_per_node={state['world_size']}"
        )
    checkpoint.check_architecture(state, unwrap(model), path)
    checkpoint.check_param_groups(state, unwrap(model), optimizer, path)
    overrides = checkpoint.optimizer_overrides(
        state["config"].get("optim", {}), to_dict(schedules.cfg)["optim"]
    )
    built = checkpoint.optimizer_settings(optimizer, scheduler)
    load_model_state_dict(model, state["model"], where=str(path))  # collectives; each rank keeps its shard
    unstepped = schedules.unstepped(unwrap(model), state["step"])
    load_optimizer_state_dict(model, optimizer, state["optimizer"], unstepped)
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.apply_settings(optimizer, scheduler, built)
    if overrides and env.main:
        print(
            f"--resume {path}: from step {state['step'] + 1} on {', '.join(overrides)} "
            "(the optimizer's moments and step come from the checkpoint)",
            flush=True,
        )
    schedules.load_state_dict(state["schedules"])
    checkpoint.set_rng_state(state["rng"][env.rank])
    loader.set_epoch(state["epoch"])
    loader.load_state_dict(state["loader"][env.rank])
    return state["step"], state["epoch"]


# --- rank 0's outputs -----------------------------------------------------------------------------


# --- preemption -----------------------------------------------------------------------------------

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again"; what a requeue script tests for (see README)


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived: the run saved a checkpoint at `step` and should be resumed."""

    exit_code = PREEMPTED_EXIT


class PreemptionFlag:
    """Catches SIGTERM and SIGUSR1. During start-up (at_once, set by train/main.py before it parses
    anything) a signal raises Preempted at once: there is nothing to save yet. From train() on it only
    sets the flag: `agreed(env)` is True on every rank at the same step once any rank caught one, so
    all ranks checkpoint the same step, and `by(env)` names the signal and the rank it was sent to."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, at_once: bool = False):
        self.caught: int | None = None
        self.at_once = at_once
        self.signalled: tuple[int, int] | None = None  # (rank, signal) once agreed
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python installs handlers there only
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _catch(self, signum, frame) -> None:
        self.caught = signum
        if self.at_once:
            self.at_once = False
            raise Preempted(
                f"stopped by signal {signal.Signals(signum).name} during start-up, before any step; "
                "nothing new to save: run the same command again (--resume auto continues from the "
                "run's last checkpoint, if it has one)"
            )

    def agreed(self, env: Env) -> bool:
        if env.world_size == 1:
            signals = [self.caught or 0]
        else:
            # Each rank fills its own slot (SUM): every rank learns who was signalled, and with what.
            # A few ints per step; the step itself syncs anyway.
            slots = torch.zeros(env.world_size, dtype=torch.int64, device=env.device)
            slots[env.rank] = self.caught or 0
            dist.all_reduce(slots)
            signals = slots.tolist()
        if not any(signals):
            return False
        # This rank's own signal if it sent one into this all-reduce (it may have caught one since)
        rank = env.rank if signals[env.rank] else next(r for r, s in enumerate(signals) if s)
        self.signalled = (rank, signals[rank])
        return True

    def by(self, env: Env) -> str:
        """'signal SIGTERM', or 'signal SIGUSR1 to rank 1' on a rank that learnt it from the all-reduce."""
        rank, signum = self.signalled or (env.rank, signal.SIGTERM)
        return f"signal {signal.Signals(signum).name}" + (f" to rank {rank}" if rank != env.rank else "")


# --- the loop -------------------------------------------------------------------------------------


def run_dir_of(cfg: Config) -> Path:
    """The run folder: run.out (on --resume train/cli.py sets it to the folder holding RUN/ckpt/)."""
    return Path(cfg.run.out or f"runs/{cfg.preset}")


def train(
    cfg: Config,
    model: nn.Module,
    optimizer,
    scheduler,
    loader,
    env: Env,
    resume_state: dict | None = None,
    preemption: PreemptionFlag | None = None,
) -> Path:
    """Run (or continue) the configured schedule; returns the run folder.

    Resumes from cfg.run.resume (resume_state: that file already read by checkpoint.read). Raises
    Preempted after checkpointing when SIGTERM/SIGUSR1 arrived on any rank. preemption: the flag
    train/main.py installed before start-up (None: train installs its own for its duration)."""
    own_flag = preemption is None
    preemption = PreemptionFlag() if own_flag else preemption
    preemption.at_once = False  # from here a signal is answered by a checkpoint after its step
    method, run_dir = unwrap(model), run_dir_of(cfg)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the data yields no full batch of {cfg.data.batch_size} per epoch; "
            "lower --data.batch_size or add data"
        )
    total = total_steps(cfg.optim, steps_per_epoch)
    stop = min(total, cfg.run.steps) if cfg.run.steps else total
    schedules = Schedules(cfg, steps_per_epoch, total)
    if schedules.lam.on and is_sharded(model):
        raise ConfigError(
            "--model.grad_ratio measures gradients with an extra backward that FSDP does not run; "
            "use --dist.strategy=ddp or --model.grad_ratio=0 with a fixed --model.lam"
        )
    step, epoch, resumed = 0, 0, bool(cfg.run.resume)
    if resumed:
        state = resume_state if resume_state is not None else checkpoint.read(cfg.run.resume)
        step, epoch = restore(state, cfg.run.resume, model, optimizer, scheduler, loader, env, schedules)
        del state, resume_state
    else:
        if (run_dir / "ckpt" / "last.pt").exists():
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with --resume "
                f"{run_dir / 'ckpt' / 'last.pt'} (or --resume auto) or pass a new --out"
            )
        seed_all(cfg.run.seed * 1000 + env.rank)  # per-rank streams (drop-path etc.); init was shared
    amp = env.device.type == "cuda" and cfg.run.amp == "bf16"
    as_run = {
        "peak_lr": peak_lr(cfg.optim, cfg.data.batch_size),
        "global_batch": cfg.data.batch_size,
        "steps": total,
        "epochs": cfg.optim.epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup_steps(cfg.optim, steps_per_epoch),
    }
    log = RunLog(run_dir, cfg, env, step, stop, as_run)
    model.train()
    with preemption if own_flag else contextlib.nullcontext():
        try:
            while step < stop:
                if not resumed:
                    loader.set_epoch(epoch)
                # A checkpoint taken on an epoch's last batch resumes into an empty remainder of it.
                yielded, may_be_empty, resumed = 0, resumed, False
                it, t0 = iter(loader), time.perf_counter()
                for batch in it:
                    t_data = time.perf_counter() - t0
                    lr = optimizer.param_groups[0]["lr"]
                    terms = train_step(
                        model,
                        batch,
                        optimizer,
                        scheduler,
                        step=step,
                        clip_grad=cfg.optim.clip_grad,
                        amp=amp,
                        schedules=schedules,
                    )
                    step, yielded = step + 1, yielded + 1
                    t_step = time.perf_counter() - t0
                    logged = cfg.run.diagnostics and step % cfg.run.log_every == 0
                    if (logged or schedules.lam.due(step)) and not is_sharded(model):
                        # Every rank (the SSL losses all-gather); rank 0 logs its own values.
                        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
                            args = schedules.forward_args(method, step - 1)  # the step just taken
                            terms.update(diagnostics(method, batch, recon=logged, **args))
                        if schedules.lam.due(step):  # model.grad_ratio: λ for the next steps
                            schedules.lam.update(terms["diag/grad.inv"], terms["diag/grad.eq"])
                    preempted = preemption.agreed(env) and step < stop  # at the last step: just finish
                    log.step(
                        step,
                        epoch,
                        lr,
                        terms,
                        t_step,
                        t_data,
                        write=step % cfg.run.log_every == 0 or step == stop or preempted,
                    )
                    if step % cfg.run.ckpt_every == 0 or step == stop or preempted:
                        saved = save_checkpoint(
                            run_dir, cfg, model, optimizer, scheduler, loader, step, epoch, env, schedules
                        )
                    if preempted:
                        raise Preempted(
                            f"stopped by {preemption.by(env)} "
                            f"after step {step}; saved {saved or run_dir / 'ckpt'}; continue with "
                            f"--resume {run_dir / 'ckpt' / 'last.pt'} (or --out {run_dir} --resume auto)"
                        )
                    if (env.main or is_sharded(model)) and (step % cfg.run.recon_every == 0 or step == stop):
                        png = run_dir / "recon" / f"step-{step:06d}.png"
                        with gathered(model):  # FSDP: every rank runs the decoder, rank 0 writes
                            save_recon_grid(
                                method, batch, cfg.data.mean, cfg.data.std, png if env.main else None
                            )
                        if env.main:
                            _copy(png, run_dir / "recon.png")
                            log.image(step, png)
                    if step >= stop:
                        break
                    t0 = time.perf_counter()
                else:
                    epoch += 1
                if yielded == 0 and not may_be_empty:
                    raise RuntimeError(f"the loader yielded no batch in epoch {epoch - 1}")
        finally:
            log.close()
    return run_dir


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        tmp = dst.with_suffix(".tmp.png")
        with writing(dst, "the reconstruction grid"):
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)
