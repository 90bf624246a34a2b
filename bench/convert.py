"""Converter throughput on ImageNet-sized JPEGs made from the embedded real photos.

    python -m bench.convert [--images 600] [--workers 1,2]

ImageNet's average training image is about 500x375 px and 110 KB. The demo photos are smaller, so
each synthetic image is a random crop of one, resized to 500x375 (a quarter portrait 375x500), with
mild sensor-like noise so its JPEG size (quality 95) lands near ImageNet's. The converter then runs
end to end (scan, full decode, tar + index + sha256) with 1 and more workers; the baseline is the
bare PIL decode of the same files in one process, the floor any converter that decodes pays.
Writes bench/results/convert-cpu.json.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench._provenance import write_result
from pipeline.convert import convert
from pipeline.demo import PHOTOS

IMAGENET_IMAGES = 1_281_167 + 50_000  # train + val


def make_imagenet_like(root: Path, n: int, classes: int = 10, seed: int = 0) -> float:
    """Write n ImageNet-sized JPEGs as root/train/<class>/*.JPEG -> mean file size in bytes."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    photos = sorted(PHOTOS.rglob("*.jpg"))
    sizes = []
    for i in range(n):
        with Image.open(rng.choice(photos)) as im:
            src = im.convert("RGB")
        w, h = (375, 500) if rng.random() < 0.25 else (500, 375)
        cw = rng.randint(src.width * 2 // 3, src.width)
        ch = min(src.height, round(cw * h / w))
        x, y = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
        img = np.asarray(src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + noise.normal(0, 11, img.shape), 0, 255).astype(np.uint8)  # (h, w, 3)
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        (folder / f"img_{i:06d}.JPEG").write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()))
    return float(np.mean(sizes))


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
        mean_bytes = make_imagenet_like(src, args.images)
        decode_only(src)  # warm-up: page cache and libjpeg
        rows = [{"what": "pil_decode", "workers": 1, "images_per_s": decode_only(src)}]
        for w in (int(x) for x in args.workers.split(",")):
            t0, c0 = time.perf_counter(), cpu_seconds()
            convert(src, Path(tmp) / f"out{w}", shard_size=args.shard_size, workers=w, quiet=True)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rows.append({"what": "convert", "workers": w, "images_per_s": args.images / wall,
                         "images_per_cpu_s": args.images / cpu, "load_avg_1min": os.getloadavg()[0]})
    for r in rows:
        print(r)
    one = next(r for r in rows if r["what"] == "convert" and r["workers"] == 1)
    summary = {
        "convert_images_per_s_per_core": one["images_per_cpu_s"],
        "convert_images_per_s.workers_1_wall": one["images_per_s"],
        "pil_decode_images_per_s": rows[0]["images_per_s"],
        "convert_vs_decode_only": one["images_per_s"] / rows[0]["images_per_s"],
        "imagenet_hours_one_core": IMAGENET_IMAGES / one["images_per_cpu_s"] / 3600,
        "mean_jpeg_kb": mean_bytes / 1000,
    }
    for r in rows[2:]:
        summary[f"convert_images_per_s.workers_{r['workers']}_wall"] = r["images_per_s"]
    config = {"images": args.images, "size": "500x375 (25% 375x500)", "jpeg_quality": 95,
              "shard_size": args.shard_size, "cores": os.cpu_count()}
    print(summary, "->", write_result("convert", config, rows, summary, device="cpu"))


if __name__ == "__main__":
    main()
