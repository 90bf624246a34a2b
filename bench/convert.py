"""Converter throughput on ImageNet-sized JPEGs made from the embedded real photos.

    python -m bench.convert [--images 600] [--workers 1,2]

The images are bench.synthetic's ImageNet-sized JPEGs (ImageNet's common shapes, ~110 KB, made from
the demo photos). The converter runs end to end (scan, full decode, tar + index + sha256) with 1 and
more workers; the baseline is the bare PIL decode of the same files in one process, the floor any
converter that decodes pays.
Writes bench/results/convert-cpu.json.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench._provenance import write_result
from bench.synthetic import make_imagenet_like
from pipeline.convert import convert

IMAGENET_IMAGES = 1_281_167 + 50_000  # train + val


def cpu_seconds() -> float:
    """CPU time of this process and its reaped workers: per-core throughput that a busy shared
    machine cannot distort the way it distorts wall-clock time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_only(root: Path) -> float:
    files = sorted(root.rglob("*.JPEG"))
    t0 = time.perf_counter()
    for f in files:
        with Image.open(io.BytesIO(f.read_bytes())) as im:
            im.load()
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--shard-size", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        source = make_imagenet_like(src, args.images)
        decode_only(src)  # warm-up: page cache and libjpeg
        rows = [{"what": "pil_decode", "workers": 1, "images_per_s": decode_only(src)}]
        for w in (int(x) for x in args.workers.split(",")):
            t0, c0 = time.perf_counter(), cpu_seconds()
            convert(src, Path(tmp) / f"out{w}", shard_size=args.shard_size, workers=w, quiet=True)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rows.append(
                {
                    "what": "convert",
                    "workers": w,
                    "images_per_s": args.images / wall,
                    "images_per_cpu_s": args.images / cpu,
                    "load_avg_1min": os.getloadavg()[0],
                }
            )
    for r in rows:
        print(r)
    one = next(r for r in rows if r["what"] == "convert" and r["workers"] == 1)
    summary = {
        "convert_images_per_s_per_core": one["images_per_cpu_s"],
        "convert_images_per_s.workers_1_wall": one["images_per_s"],
        "pil_decode_images_per_s": rows[0]["images_per_s"],
        "convert_vs_decode_only": one["images_per_s"] / rows[0]["images_per_s"],
        "imagenet_hours_one_core": IMAGENET_IMAGES / one["images_per_cpu_s"] / 3600,
        "mean_jpeg_kb": source["mean_jpeg_kb"],
    }
    for r in rows[2:]:
        summary[f"convert_images_per_s.workers_{r['workers']}_wall"] = r["images_per_s"]
    config = {**source, "shard_size": args.shard_size, "cores": os.cpu_count()}
    print(summary, "->", write_result("convert", config, rows, summary, device="cpu"))


if __name__ == "__main__":
    main()
