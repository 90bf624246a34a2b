"""Input-pipeline throughput: DALI on the GPU, DALI on the CPU, and the PyTorch reference in a DataLoader.

    python -m bench.pipeline [--data SHARDS] [--images N] [--batch B] [--seconds S] [--only dali_gpu,...]

One sample = view 1 + view 2 + K = 2 path targets at 224×224 with every transformation family active
(the full `Batch` a training step consumes, delivered on the measured device). All pipelines read the
same shards in the same run. Without --data, synthetic ImageNet-sized JPEGs are made from the embedded
demo photos (resized to ImageNet's typical 500×375 / 375×500 / 500×333, light sensor-like noise so that
they compress like photos, quality 90) and converted with pipeline.convert; the result JSON says so.

Per pipeline: samples/s after warm-up (the device synchronised before reading the clock), the
machine's CPU utilisation over the timed window (from /proc/stat, all cores), and for CUDA the GPU
memory in use (device-wide, so DALI's own pool is counted). Writes bench/results/pipeline-<device>.json.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._provenance import write_result
from pipeline.batch import DataConfig
from pipeline.convert import convert
from pipeline.demo import PHOTOS
from pipeline.path import PathConfig

PIPELINES = ("dali_gpu", "dali_cpu", "reference")
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))  # (W, H), the common ImageNet shapes
CLASSES = 8


def _synthetic_image(task: tuple[int, str, Path]) -> int:
    i, photo, out = task
    rng = random.Random(i)
    with Image.open(photo) as im:
        im = im.convert("RGB")
        w, h = rng.choice(IMAGENET_SIZES)
        # a random crop of the photo (so no two files are the same), scaled to ImageNet size
        cw, ch = rng.randint(im.width // 2, im.width), rng.randint(im.height // 2, im.height)
        x0, y0 = rng.randint(0, im.width - cw), rng.randint(0, im.height - ch)
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    px = np.asarray(im, dtype=np.float32)
    px += np.random.default_rng(i).normal(0, 10.0, px.shape)  # upscaled photos are too smooth otherwise
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    path = out / f"c{i % CLASSES}" / f"img_{i:06d}.JPEG"
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def synthetic_shards(root: Path, n: int, shard_size: int, workers: int) -> tuple[Path, dict]:
    """n ImageNet-sized JPEGs made from the demo photos -> converted shards folder, description."""
    src = root / "images" / "train"
    for c in range(CLASSES):
        (src / f"c{c}").mkdir(parents=True, exist_ok=True)
    photos = sorted(PHOTOS.glob("train/*/*.jpg"))
    with Pool(workers) as pool:
        sizes = pool.map(_synthetic_image, [(i, photos[i % len(photos)], src) for i in range(n)])
    out = root / "shards"
    convert(root / "images", out, split="train", shard_size=shard_size, workers=workers, quiet=True)
    return out, {"synthetic": True, "images": n, "sizes_wh": IMAGENET_SIZES, "jpeg_quality": 90,
                 "mean_jpeg_kb": round(sum(sizes) / n / 1024, 1),
                 "made_from": "pipeline/demo_photos (random crops, resized, noise σ=10 grey levels)"}


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


def measure(loader, device: torch.device, warmup: int, seconds: float, max_batches: int) -> dict:
    """Iterate the loader (across epochs if needed): warm-up batches, then time until `seconds` pass."""
    cuda = device.type == "cuda"
    clock, epoch, done, samples = CpuClock(), 0, 0, 0
    t0 = None
    if cuda:
        torch.cuda.synchronize(device)
        free0, total_mem = torch.cuda.mem_get_info(device)
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            done += 1
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                clock.start()
                t0 = time.perf_counter()
            elif t0 is not None:
                samples += len(batch)
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds or done - warmup >= max_batches:
                    break
        else:
            epoch += 1
            continue
        break
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    row = {"batches": done - warmup, "samples": samples, "seconds": round(elapsed, 3),
           "samples_per_s": round(samples / elapsed, 1), "cpu_util": clock.stop(),
           "shape_view": list(batch.view1.shape[1:]), "shape_targets": list(batch.targets.shape[1:])}
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


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shard folder from pipeline.convert (default: synthetic ImageNet-sized JPEGs)")
    p.add_argument("--images", type=int, default=0, help="synthetic images (default 4096 with CUDA, 384 without)")
    p.add_argument("--batch", type=int, default=0, help="batch size (default 256 with CUDA, 32 without)")
    p.add_argument("--seconds", type=float, default=0, help="timed seconds per pipeline (default 20 / 15)")
    p.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers / DALI threads")
    p.add_argument("--only", default=",".join(PIPELINES), help="comma-separated subset of " + ", ".join(PIPELINES))
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    batch = args.batch or (256 if cuda else 32)
    seconds = args.seconds or (20.0 if cuda else 15.0)
    wanted = [w for w in args.only.split(",") if w]
    for w in wanted:
        if w not in PIPELINES:
            p.error(f"--only: unknown pipeline {w!r}; choose from {', '.join(PIPELINES)}")
    if "dali_gpu" in wanted and not cuda:
        print("no CUDA device: skipping dali_gpu")
        wanted.remove("dali_gpu")

    tmp = None
    if args.data:
        data, source = Path(args.data), {"synthetic": False, "path": str(args.data)}
    else:
        n = args.images or (4096 if cuda else 384)
        tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
        # at least two shards per DataLoader worker, so every worker has data
        shard_size = max(1, min(1000, n // (2 * args.workers)))
        t = time.perf_counter()
        data, source = synthetic_shards(Path(tmp.name), n, shard_size, args.workers)
        print(f"made {n} synthetic ImageNet-sized JPEGs ({source['mean_jpeg_kb']} KB mean) in "
              f"{time.perf_counter() - t:.0f}s")

    cfg = DataConfig(dir=str(data), img_size=224, target_size=224, batch_size=batch, workers=args.workers,
                     shuffle_buffer=1024, aug=PathConfig(transforms=("all",), k=2))
    rows = []
    for which in wanted:
        loader = build(which, cfg, data, device)
        row = {"pipeline": which, "batch_size": batch, "workers": args.workers,
               **measure(loader, device, args.warmup, seconds, max_batches=10_000)}
        del loader
        print(row)
        rows.append(row)
    by = {r["pipeline"]: r["samples_per_s"] for r in rows}
    summary = {f"{w}_samples_per_s": by.get(w) for w in PIPELINES}
    if by.get("reference"):
        for w in ("dali_gpu", "dali_cpu"):
            summary[f"{w}_vs_reference"] = round(by[w] / by["reference"], 2) if by.get(w) else None
    config = {"sample": "view1 + view2 + K=2 targets, 224x224, all transformations, on the measured device",
              "batch_size": batch, "workers_or_threads": args.workers, "cores": os.cpu_count(),
              "seconds_per_pipeline": seconds, "warmup_batches": args.warmup, "data": source,
              "pipelines": wanted}
    path = write_result("pipeline", config, rows, summary, device)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return path


if __name__ == "__main__":
    main()
