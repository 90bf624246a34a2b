"""`python -m bench.science`: the parts of the science run (see bench/science/__init__.py)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bench.science.data import ROOT, fetch, log, prepare_data
from bench.science.report import report, summarise
from bench.science.runs import probe_baselines, probe_run, run_dir, train_one, trained
from bench.science.sizes import SIZES
from pipeline.errors import UserError
from pipeline.folder_lock import hold

PARTS = ("fetch", "data", "train", "probe", "report")
KEEP = ("train.json", "probe.json", "recon.png", "config.json", "metrics.jsonl")  # what --copy-results copies


class Held(UserError):
    """A run (or the baselines) that another science process holds."""


def write_partial(work: Path, runs: list[tuple[str, int]]) -> None:
    """work/summary-partial.json: the summary of every run probed so far."""
    records = [
        json.loads((run_dir(work, m, s) / "probe.json").read_text())
        for m, s in runs
        if (run_dir(work, m, s) / "probe.json").is_file()
    ]
    baselines = json.loads((work / "baselines.json").read_text())
    out = work / "summary-partial.json"
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # several science processes may share one work folder
    tmp.write_text(json.dumps(summarise(records, baselines), indent=2) + "\n")
    tmp.replace(out)
    log(f"{len(records)} of {len(runs)} runs probed: {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.science", description="the science run, in resumable parts"
    )
    ap.add_argument("--size", choices=tuple(SIZES), default="gpu")
    ap.add_argument("--work", default="", help="data, runs and probe results (default: runs/science-<size>)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--methods", default="", help="comma list (default: the size's methods)")
    ap.add_argument("--seeds", default="", help="comma list (default: the size's seeds)")
    ap.add_argument("--steps", type=int, default=0, help="steps per run instead of the size's (smoke runs)")
    ap.add_argument(
        "--probe-pairs",
        type=int,
        default=None,
        help="train pairs per probe family and mask instead of the size's (0: the readout's minimum)",
    )
    ap.add_argument("--workers", type=int, default=max(1, min(8, (multiprocessing.cpu_count() or 2))))
    ap.add_argument(
        "--copy-results", default="", help="copy each probed run's small files (no checkpoints) here"
    )
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    if args.steps:  # a smoke run of the same sequence (bench/gpu_science.sh --dry-run)
        size = replace(size, steps=args.steps)
    if args.probe_pairs is not None:  # e.g. the smoke run's probe at the readout's minimum
        if args.probe_pairs < 0:
            ap.error(f"--probe-pairs takes a count >= 0, got {args.probe_pairs}")
        size = replace(size, probe_pairs=args.probe_pairs)
    work = Path(args.work or ROOT / "runs" / f"science-{args.size}").resolve()
    methods = [m for m in args.methods.split(",") if m] or list(size.methods)
    seeds = [int(s) for s in args.seeds.split(",") if s] or list(size.seeds)
    parts = [p for p in args.parts.split(",") if p]
    if bad := [m for m in methods if m not in size.methods]:
        ap.error(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(size.methods)}")
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts: unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    if size.device == "cuda" and not torch.cuda.is_available() and {"train", "probe"} & set(parts):
        ap.error("--size gpu needs a CUDA GPU; use --size cpu for the CPU-sized run")
    work.mkdir(parents=True, exist_ok=True)
    if size.threads:
        # On a CPU shared with other jobs, one thread per process avoids stragglers in every matmul.
        torch.set_num_threads(size.threads)
    if "fetch" in parts:
        fetch(work / "raw")
    if "data" in parts:
        prepare_data(work, size, args.workers)
    data = json.loads((work / "data.json").read_text()) if {"train", "report"} & set(parts) else {}
    runs = [(m, s) for s in seeds for m in methods]
    device = torch.device(size.device)
    # Seed by seed, each run trained then probed; the summary so far is rewritten after every probe, so
    # an interrupted run leaves its finished results readable (and the same command continues it).
    # Several processes may share one work folder (e.g. one per core, --seeds in other orders): a run
    # held by another process is skipped here, and the last process to finish writes the full report.
    for method, seed in runs:
        run = run_dir(work, method, seed)
        run.mkdir(parents=True, exist_ok=True)
        try:
            with hold(run, ".science.lock", Held):
                if "train" in parts:
                    train_one(work, size, method, seed, data["n_train_crops"])
                if "probe" in parts and trained(run):
                    with hold(work, ".baselines.lock", Held, wait=True):  # computed once
                        probe_baselines(work, size, device, run / "ckpt" / "last.pt")
                    probe_run(work, size, method, seed, device)
                    write_partial(work, runs)
        except Held as held:
            log(f"{method} seed {seed}: held by another science process ({held}); skipped here")
    if args.copy_results:
        dst_root = Path(args.copy_results)
        dst_root.mkdir(parents=True, exist_ok=True)
        for name in ("data.json", "baselines.json"):
            if (work / name).is_file():
                shutil.copyfile(work / name, dst_root / name)
        for method, seed in runs:
            run, dst = run_dir(work, method, seed), dst_root / "runs" / f"{method}-s{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for name in KEEP:
                if (run / name).is_file():
                    shutil.copyfile(run / name, dst / name)
    if "report" in parts:
        # Every probed run found, also those whose results were copied back from another machine.
        records = [
            json.loads((run_dir(work, m, s) / "probe.json").read_text())
            for m, s in runs
            if (run_dir(work, m, s) / "probe.json").is_file()
        ]
        if not records or not (work / "baselines.json").is_file():
            raise SystemExit(
                f"science: no probed runs (or no baselines.json) under {work}; run the train and "
                f"probe parts first"
            )
        baselines = json.loads((work / "baselines.json").read_text())
        path = report(work, args.size, size, records, baselines, data)
        log(f"wrote {path}")
        summary = json.loads(path.read_text())["summary"]
        for key, value in summary.items():
            if key.count(".") == 2 and key.split(".")[0] in ("r2", "diff") and value is not None:
                std = summary.get(key.replace(".", "_std.", 1))
                print(f"  {key:<40} {value:+.3f}" + (f" ± {std:.3f}" if std is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
