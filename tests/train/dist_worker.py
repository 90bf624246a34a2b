"""The torchrun worker of tests/train/test_distributed.py: a few optimizer steps of a tiny method on
CPU Gloo ranks, under DDP and FSDP, on synthetic batches that depend only on the step.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/dist_worker.py OUT \
        --method vicreg|dinov2 --runs ddp fsdp ddp:fsdp fsdp:ddp [--steps 5] [--save-at 2]

Each run spec is STRATEGY (train from step 0 to --steps, saving the state at --save-at) or
STRATEGY:FROM (resume from the state run FROM saved, under STRATEGY, and continue to --steps). The
runs share one process group, so the launch and imports are paid once. Every rank takes its slice
of the same global batch, so all strategies see the same data. Rank 0 writes, per run, OUT/NAME.pt
({"losses", "grad_norms"} per step run, rank-averaged; "model", the final full state dict; for the
DINO family "ema": the full state just before and after the first teacher update and its momentum)
and OUT/NAME-state.pt (model, optimizer, scheduler and step, as a checkpoint holds them); NAME is
the spec with ":" written "-from-".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model import build_method
from model.config import DinoConfig
from model.teacher import teacher_momentum
from pipeline import masks as ibot_masks
from pipeline.batch import Batch
from pipeline.path import sample_theta
from train.config import Config
from train.distributed import (
    DistConfig,
    clip_grad_norm,
    gathered,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
    unwrap,
    wrap_model,
)
from train.optim import build_optimizer
from train.recipes import load_config
from train.schedules import build_scheduler

GLOBAL_BATCH, LOCAL_CROPS, LOCAL_SIZE = 8, 2, 16
# 32 px views, patch 8 (a 4x4 grid), vit_tiny cut to 2 blocks: a step takes well under a second.
TINY = (
    "--data.img_size=32",
    "--model.depth=2",
    "--model.expander=64,64",
    f"--data.batch_size={GLOBAL_BATCH}",
    "--optim.epochs=10",
    "--optim.warmup_epochs=1",
    "--optim.clip_grad=1.0",
)
PRESETS = {"vicreg": "demo-vicreg", "dinov2": "demo"}  # the DINO family rides on the demo's path method
STEPS_PER_EPOCH = 2  # the schedule: 10 epochs of 2 steps, warm-up over the first 2


def build(method_name: str) -> torch.nn.Module:
    cfg = load_config(PRESETS[method_name], list(TINY))
    torch.manual_seed(0)  # identical initial weights on every rank and under every strategy
    if method_name == "vicreg":
        return build_method(cfg.model, cfg.data)
    head = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    return build_method(dataclasses.replace(cfg.model, family="dinov2", dino=head), cfg.data)


def global_batch(cfg: Config, step: int, multicrop: bool) -> Batch:
    """The whole batch of a step, from its own seed: smooth random views, targets and θ."""
    gen = torch.Generator().manual_seed(1000 + step)
    s, t, k, b = cfg.data.img_size, cfg.data.out_target_size, cfg.data.aug.k, GLOBAL_BATCH

    def smooth(n: int, size: int) -> torch.Tensor:  # (n, 3, size, size) photo-like: 4x4 noise upsampled
        coarse = torch.randn(n, 3, 4, 4, generator=gen)
        return torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False
        )

    fields = {
        "view1": smooth(b, s),
        "view2": smooth(b, s),
        "targets": smooth(b * k, t).reshape(b, k, 3, t, t),
        "theta": sample_theta(cfg.data.aug, torch.full((b, 2), 256), gen),
        "label": torch.full((b,), -1, dtype=torch.long),
    }
    if not multicrop:
        return Batch(**fields)
    grid = (s // cfg.model.patch_size,) * 2
    masks = ibot_masks.block_masks(2 * b, grid, random.Random(step), ranges=((0.2, 0.5),)).view(b, 2, -1)
    local = smooth(b * LOCAL_CROPS, LOCAL_SIZE).view(b, LOCAL_CROPS, 3, LOCAL_SIZE, LOCAL_SIZE)
    return Batch(**fields, local=local, masks=masks)


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    n = len(batch) // world
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    parts = {
        k: v if v is None else v[rank * n : (rank + 1) * n] for k, v in fields.items()
    }  # local/masks: None
    return type(batch)(**parts)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy: under DDP on CPU the state dict holds the live tensors, as state_dict() does."""
    return {k: v.clone() for k, v in model_state_dict(model).items()}


def run(
    cfg: Config, method_name: str, strategy: str, resume: Path | None, steps: int, save_at: int, out: Path
) -> dict:
    """One training run from step 0 (or from the state at `resume`); returns what rank 0 records."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    model = wrap_model(build(method_name), DistConfig(strategy=strategy), device, world)
    optimizer = build_optimizer(cfg.optim, unwrap(model), cfg.data.batch_size, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.data.batch_size, STEPS_PER_EPOCH)
    is_dino = unwrap(model).teacher is not None
    total = round(cfg.optim.epochs * STEPS_PER_EPOCH)

    step = 0
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=False)  # our own file
        load_model_state_dict(model, state["model"], where=str(resume))
        load_optimizer_state_dict(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]

    record: dict = {"losses": [], "grad_norms": []}
    if is_dino:  # teacher tensors whose layout is not their student's (FSDP: DTensor shards of one placement)
        student = unwrap(model).invariant._student(unwrap(model).encoder)
        pairs = zip(unwrap(model).teacher.module.named_parameters(), student.parameters())
        record["teacher_layout"] = [
            name
            for (name, t), s in pairs
            if type(t) is not type(s)
            or (
                isinstance(t, DTensor)
                and (t.placements != s.placements or t.to_local().shape != s.to_local().shape)
            )
        ]
        record["teacher_sharded"] = all(isinstance(t, DTensor) for t in unwrap(model).teacher.parameters())
    model.train()
    while step < steps:
        batch = rank_slice(global_batch(cfg, step, is_dino), rank, world)
        out_terms = model(batch, **({"teacher_temp": (0.04, 0.04)} if is_dino else {}))
        out_terms["loss"].backward()
        if "grad_mismatch" not in record:  # trainable parameters without a gradient, frozen ones with one
            record["grad_mismatch"] = [
                n for n, p in unwrap(model).named_parameters() if (p.grad is None) == p.requires_grad
            ]
        record["grad_norms"].append(clip_grad_norm(unwrap(model).parameters(), cfg.optim.clip_grad).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if is_dino:
            momentum = teacher_momentum(step, total, base=0.9)  # far from 1: the update is visible
            before = snapshot(model) if "ema" not in record else None
            unwrap(model).update_teacher(momentum)
            if before is not None:
                record["ema"] = {"before": before, "after": snapshot(model), "momentum": momentum}
        loss = out_terms["loss"].detach().clone()
        dist.all_reduce(loss)
        record["losses"].append(loss.item() / world)
        step += 1
        if step == save_at:
            state = {
                "model": model_state_dict(model),
                "optimizer": optimizer_state_dict(model, optimizer),
                "scheduler": scheduler.state_dict(),
                "step": step,
            }
            if rank == 0:
                torch.save(state, out)
    record["model"] = model_state_dict(model)
    if is_dino:  # the trainer's picture: a call other than forward, on every rank under FSDP
        with gathered(model):
            record["recon"] = unwrap(model).reconstruct(batch)
    return record


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", choices=tuple(PRESETS), default="vicreg")
    parser.add_argument(
        "--runs", nargs="+", required=True, help="STRATEGY or STRATEGY:FROM, e.g. ddp fsdp ddp:fsdp"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-at", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(PRESETS[args.method], list(TINY))
    for spec in args.runs:
        strategy, _, source = spec.partition(":")
        name = spec.replace(":", "-from-")
        resume = args.out / f"{source}-state.pt" if source else None
        record = run(
            cfg, args.method, strategy, resume, args.steps, args.save_at, args.out / f"{name}-state.pt"
        )
        if dist.get_rank() == 0:
            torch.save(record, args.out / f"{name}.pt")
    dist.destroy_process_group()
    # Leave without the interpreter's finalization: once in CI, rank 1 aborted there ("terminate called
    # without an active exception", SIGABRT) after every record had been written, which failed the
    # launch. What is under test is in the records; the Gloo teardown at exit is not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
