"""Equivariance-probe wall time: the old protocol and the new default side by side, in one process.

    python -m bench.probe [--images 30] [--before-families rotation] [--threads 0] [--out DIR]

The backbone is the `demo` preset's model (the probe's cost does not depend on its weights, so it is
left at its init), probed on real photos: the first `--images` demo photos (crops of 8 source photos,
a 30-image set by default, as in issue 20) and, for the `make train` row, all 80 of them.

    before       the protocol before the ridge readout: the `fast` MLP (3 probe seeds), the old pair
                 rule (>= 5000 train pairs per family: 239 pairs per image at 30 images), mask disc,
                 pool mean, every part (all, inv, eq); on `--before-families` only (rotation: one
                 family of six; every family renders and embeds the same count, so the six-family
                 time is about six times it, reported as `before_est_s`, an extrapolation)
    after        the default of `train/probe.py equivariance` (ridge, 4 folds x 4 assignments, masks
                 disc and none, pools tokens and grid2, parts all and eq) on the same families
    default      the default on all six families, with both baselines: the issue's "<= 3 minutes"
    make_train   the probe step of `make train`: train+val demo photos, rotation and translation

Rows hold the wall time, images embedded, images/s and the readouts' time, the threads used and the
machine's load average when each row started (the machine may be shared). Results:
bench/results/probe-<device>.json (bench/_provenance.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/probe.py` from anywhere

import torch

from bench._provenance import write_result
from model import build_method
from pipeline.demo import ensure_demo_shards
from train import checkpoint
from train.backbones import Backbone, load_backbone
from train.config import to_dict
from train.probe_embed import Embedder
from train.probes import ProbeConfig, embedders_for, equivariance, read_split, set_threads
from train.recipes import load_config

BEFORE = {"protocol": "fast", "min_train_pairs": 5000, "mask": "disc", "pool": "mean"}


def demo_backbone(folder: Path) -> Backbone:
    """The demo preset's model at init, saved as train/main.py saves a checkpoint and loaded as the
    probe CLI loads one."""
    cfg = load_config("demo")
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.data)
    path = folder / "demo-init.pt"
    state = {"format": checkpoint.FORMAT, "model": method.state_dict(), "config": to_dict(cfg), "step": 0}
    torch.save(
        {**state, "checksum": checkpoint.digest(state)},
        path,  # what checkpoint.save adds last
    )
    return load_backbone(path)


def measure(name: str, bb: Backbone, samples, cfg: ProbeConfig, parts: tuple[str, ...]) -> dict:
    emb = Embedder.from_backbone(bb, cfg.pools[0])
    emb.parts = tuple(p for p in emb.parts if p in parts)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = equivariance(embedders_for(emb, cfg.baselines), samples, cfg, torch.device("cpu"), quiet=True)
    wall = time.perf_counter() - start
    row = {
        "row": name,
        "wall_s": round(wall, 1),
        "families": list(cfg.transforms),
        "images": out["pairs"]["images"],
        "photos": out["pairs"]["photos"],
        "per_image": out["pairs"]["per_image"],
        "protocol": cfg.protocol,
        "mask": cfg.mask,
        "pool": cfg.pool,
        "parts": list(emb.parts),
        "load_avg_1min": round(load, 2),
        **out["speed"],
    }
    print(
        f"{name:<11} {wall:7.1f} s  {row['images_embedded']:>6} images at {row['images_per_s']} images/s, "
        f"readouts {row['fit_s']} s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/probe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=30, help="photos of the before/after/default rows")
    ap.add_argument("--before-families", default="rotation", help="families of the before/after rows")
    ap.add_argument("--before-pairs", type=int, default=BEFORE["min_train_pairs"], help="the old pair rule")
    ap.add_argument("--after-pairs", type=int, default=0, help="train pairs of the new rows (0: the rule)")
    ap.add_argument("--rows", default="before,after,default,make_train", help="which rows to run")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: as train/probe.py: one per core)"
    )
    ap.add_argument("--out", default="", help="also copy the result JSON into this folder")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads, torch.device("cpu"))
    shards = ensure_demo_shards()
    photos = read_split(shards, "train") + read_split(shards, "val")
    small = photos[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        bb = demo_backbone(Path(tmp))
    families = tuple(f for f in args.before_families.split(",") if f)
    before = ProbeConfig(transforms=families, **(BEFORE | {"min_train_pairs": args.before_pairs}))
    plan = {
        "before": (small, before, ("all", "inv", "eq")),
        "after": (small, ProbeConfig(transforms=families, min_train_pairs=args.after_pairs), ("all", "eq")),
        "default": (small, ProbeConfig(min_train_pairs=args.after_pairs), ("all", "eq")),
        "make_train": (
            photos,
            ProbeConfig(transforms=("rotation", "translation"), min_train_pairs=args.after_pairs),
            ("all", "eq"),
        ),
    }
    rows = [measure(name, bb, *plan[name]) for name in args.rows.split(",") if name]
    by = {r["row"]: r for r in rows}
    summary = {f"probe_s.{r['row']}": r["wall_s"] for r in rows}
    summary |= {f"images_per_s.{r['row']}": r["images_per_s"] for r in rows}
    if "before" in by and "after" in by:
        summary["speedup.after_vs_before"] = round(by["before"]["wall_s"] / by["after"]["wall_s"], 1)
        summary["before_est_s"] = round(by["before"]["wall_s"] * 6 / len(families), 1)
    config = {
        "backbone": bb.name,
        "data": "demo photos (pipeline.demo), crops of 8 source photos",
        "images": args.images,
        "before_families": list(families),
        "before": BEFORE | {"min_train_pairs": args.before_pairs},
        "after_pairs": args.after_pairs or "the rule (train/probe.py ProbeConfig.pairs_per_image)",
        "threads": threads,
        "cores": os.cpu_count(),
    }
    print(summary)
    print("->", write_result("probe", config, rows, summary, device="cpu", out=args.out or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
