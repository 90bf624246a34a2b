"""Input-pipeline throughput: DALI on the GPU, DALI on the CPU, and the PyTorch reference in a DataLoader.

    python -m bench.pipeline [--data SHARDS] [--images N] [--batch B] [--warmup W] [--size PX]
        [--workers N] [--only dali_gpu,dali_cpu,reference] [--out DIR]

One sample = view 1 + view 2 + K = 2 path targets at --size (224) px with every transformation family
active (the full `Batch` a training step consumes, delivered on the measured device). All pipelines
read the same shards in the same run, with the same cores: DataLoader workers and DALI threads are
both --workers (default: every core this process may use). Without --data, synthetic ImageNet-sized
JPEGs are made from the embedded demo photos (resized to ImageNet's typical 500×375 / 375×500 /
500×333, light sensor-like noise so that they compress like photos, quality 90) and converted with
pipeline.convert; the result JSON says so.

Steady state, within one epoch: each pipeline starts epoch 0, hands out W warm-up batches (pipeline
build, worker start, first decodes) untimed, then the clock runs over the next batches up to TAIL
batches before the epoch ends (the drain, where prefetching stops, is left out too), and the rest of
the epoch is read untimed. No pipeline is rebuilt inside the window, since the window never crosses
an epoch; a dataset too small for W + MIN_TIMED + TAIL batches is an error. The DataLoader's workers
pass every batch through /dev/shm (prefetch 2 per worker), so the workers are lowered to what
/dev/shm holds, and the JSON says when that happened.

Per pipeline: samples/s over the window (the device synchronised before reading the clock), the
machine's CPU utilisation over it (from /proc/stat, all cores), and for CUDA the GPU memory in use
(device-wide, so DALI's own pool is counted). Writes bench/results/pipeline-<device>.json (and --out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._provenance import write_result
from bench.synthetic import make_imagenet_like
from pipeline.batch import DataConfig
from pipeline.convert import convert
from pipeline.path import PathConfig

PIPELINES = ("dali_gpu", "dali_cpu", "reference")
CLASSES = 8


def synthetic_shards(root: Path, n: int, shard_size: int, workers: int) -> tuple[Path, dict]:
    """n ImageNet-sized JPEGs made from the demo photos (bench/synthetic.py) -> converted shards, description."""
    info = make_imagenet_like(root / "images", n, classes=CLASSES, workers=workers)
    out = root / "shards"
    convert(root / "images", out, split="train", shard_size=shard_size, workers=workers, quiet=True)
    return out, info


class CpuClock:
    """Whole-machine CPU utilisation between start() and stop(), from /proc/stat (0..1 of all cores)."""

    @staticmethod
    def _read() -> tuple[int, int]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0, 0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> float | None:
        total, idle = (b - a for a, b in zip(self.t0, self._read()))
        return round(1 - idle / total, 3) if total > 0 else None


K_TARGETS = 2
PREFETCH = 2  # the reference DataLoader's prefetch_factor (pipeline/reference.py)
TAIL = 2  # batches before the epoch's end that are left out of the window
MIN_TIMED = 5


def batch_bytes(batch: int, size: int) -> int:
    """Bytes of one Batch as the reference loader's workers hand it over (fp32 views and targets)."""
    return batch * (2 + K_TARGETS) * 3 * size * size * 4


def shm_workers(wanted: int, batch: int, size: int, shm: str = "/dev/shm") -> tuple[int, dict]:
    """Workers that fit /dev/shm (each holds PREFETCH batches there, with 25% headroom), and the record."""
    need = int(batch_bytes(batch, size) * PREFETCH * 1.25)
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return wanted, {
            "shm_free_gb": None,
            "shm_per_worker_gb": round(need / 2**30, 2),
            "workers_limited_by_shm": False,
        }
    fits = free // need
    workers = max(0, min(wanted, fits))
    return workers, {
        "shm_free_gb": round(free / 2**30, 1),
        "shm_per_worker_gb": round(need / 2**30, 2),
        "workers_limited_by_shm": workers < wanted,
    }


def measure(loader, device: torch.device, warmup: int) -> dict:
    """One epoch: `warmup` batches untimed, the clock over all but the last TAIL, the tail untimed."""
    n = len(loader)
    timed = n - warmup - TAIL
    if timed < MIN_TIMED:
        raise SystemExit(
            f"error: the dataset gives {n} batches per epoch: too few for {warmup} warm-up + "
            f"{MIN_TIMED} timed + {TAIL} tail batches; use more --images or a smaller --batch"
        )
    cuda = device.type == "cuda"
    clock, samples = CpuClock(), 0
    if cuda:
        torch.cuda.synchronize(device)
        free0, total_mem = torch.cuda.mem_get_info(device)
    loader.set_epoch(0)
    t0 = elapsed = None
    shapes = {}
    for done, batch in enumerate(loader, 1):
        if done == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            clock.start()
            t0 = time.perf_counter()
        elif t0 is not None and elapsed is None:
            samples += len(batch)
            if done == warmup + timed:
                if cuda:
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t0
                cpu = clock.stop()
                shapes = {
                    "shape_view": list(batch.view1.shape[1:]),
                    "shape_targets": list(batch.targets.shape[1:]),
                }
    row = {
        "batches_per_epoch": n,
        "timed_batches": timed,
        "samples": samples,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 1),
        "cpu_util": cpu,
        **shapes,
    }
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        row["gpu_mem_used_gb"] = round((total_mem - free) / 2**30, 2)
        row["gpu_mem_added_gb"] = round((free0 - free) / 2**30, 2)
    return row


def build(which: str, cfg: DataConfig, data: Path, device: torch.device):
    if which == "reference":
        from pipeline.reference import build_reference_loader

        return build_reference_loader(cfg, data, 0, 1, device)
    from pipeline.dali import DaliLoader

    return DaliLoader(cfg, data, 0, 1, device, dali_device="gpu" if which == "dali_gpu" else "cpu")


def dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", help="shard folder from pipeline.convert (default: synthetic ImageNet-sized JPEGs)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=0,
        help="synthetic images (default: enough for warm-up + 40 timed batches with CUDA, 12 without)",
    )
    p.add_argument("--batch", type=int, default=0, help="batch size (default 256 with CUDA, 32 without)")
    p.add_argument(
        "--warmup", type=int, default=0, help="untimed batches first (default 5 with CUDA, 2 without)"
    )
    p.add_argument("--size", type=int, default=224, help="view and target resolution")
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="DataLoader workers and DALI threads (default: the cores this process may use)",
    )
    p.add_argument(
        "--only", default=",".join(PIPELINES), help="comma-separated subset of " + ", ".join(PIPELINES)
    )
    p.add_argument("--out", default=None, help="folder to write the result JSON into as well")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    batch = args.batch or (256 if cuda else 32)
    warmup = args.warmup or (5 if cuda else 2)
    wanted = [w for w in args.only.split(",") if w]
    for w in wanted:
        if w not in PIPELINES:
            p.error(f"--only: unknown pipeline {w!r}; choose from {', '.join(PIPELINES)}")
    skipped = {}
    if "dali_gpu" in wanted and not cuda:
        skipped["dali_gpu"] = "no CUDA device"
    dali_error = dali_import_error()
    for w in ("dali_gpu", "dali_cpu"):
        if w in wanted and w not in skipped and dali_error:
            skipped[w] = f"DALI does not import ({dali_error})"
    workers, shm = shm_workers(args.workers, batch, args.size)
    if "reference" in wanted and workers == 0:
        skipped["reference"] = (
            f"/dev/shm has {shm['shm_free_gb']} GB free, under one worker's "
            f"{shm['shm_per_worker_gb']} GB; enlarge it or lower --batch"
        )
    for w, why in skipped.items():
        print(f"skipping {w}: {why}")
    wanted = [w for w in wanted if w not in skipped]

    tmp = None
    if args.data:
        data, source = Path(args.data), {"synthetic": False, "path": str(args.data)}
    else:
        n = args.images or batch * (warmup + (40 if cuda else 12) + TAIL)
        tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
        # at least two shards per DataLoader worker, so every worker has data
        shard_size = max(1, min(1000, n // (2 * max(1, args.workers))))
        t = time.perf_counter()
        data, source = synthetic_shards(Path(tmp.name), n, shard_size, max(1, args.workers))
        print(
            f"made {n} synthetic ImageNet-sized JPEGs ({source['mean_jpeg_kb']} KB mean) in "
            f"{time.perf_counter() - t:.0f}s"
        )

    rows = []
    for which in wanted:
        threads = workers if which == "reference" else args.workers
        cfg = DataConfig(
            dir=str(data),
            img_size=args.size,
            target_size=args.size,
            batch_size=batch,
            workers=threads,
            shuffle_buffer=1024,
            aug=PathConfig(transforms=("all",), k=K_TARGETS),
        )
        loader = build(which, cfg, data, device)
        row = {
            "pipeline": which,
            "batch_size": batch,
            "workers_or_threads": threads,
            **measure(loader, device, warmup),
        }
        del loader
        print(row, flush=True)
        rows.append(row)
    by = {r["pipeline"]: r["samples_per_s"] for r in rows}
    summary = {f"{w}_samples_per_s": by.get(w) for w in PIPELINES}
    if by.get("reference"):
        for w in ("dali_gpu", "dali_cpu"):
            summary[f"{w}_vs_reference"] = round(by[w] / by["reference"], 2) if by.get(w) else None
    config = {
        "sample": f"view1 + view2 + K={K_TARGETS} targets, {args.size}x{args.size}, all transformations, "
        "on the measured device",
        "batch_size": batch,
        "workers_or_threads": args.workers,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "reference_workers": workers,
        **shm,
        "warmup_batches": warmup,
        "tail_batches": TAIL,
        "window": "one epoch: after the warm-up batches, up to the tail; no pipeline rebuild inside",
        "data": source,
        "pipelines": wanted,
        "skipped": skipped,
    }
    path = write_result("pipeline", config, rows, summary, device, out=args.out)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
