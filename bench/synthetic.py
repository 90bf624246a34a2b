"""The benches' one synthetic data set: ImageNet-sized JPEGs made from the embedded demo photos.

ImageNet's images are mostly 500x375, 375x500, 500x333 or 500x400 px, about 110 KB each. The demo
photos are smaller, so each synthetic image is a random crop of one (the target's aspect ratio, 2/3
to all of the photo's width) resized to one of those shapes, with mild sensor-like noise: an
upscaled photo is too smooth and would compress far better than a real one. At quality 95 the
files land near ImageNet's size. Image i depends only on (seed, i), so any number of processes
writes the same files.

    info = make_imagenet_like(root, n=600, classes=10)   # root/train/n00000000/img_000000.JPEG ...
"""

from __future__ import annotations

import io
import random
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo import PHOTOS

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))  # (W, H), ImageNet's common shapes
QUALITY = 95
NOISE = 11.0  # grey levels (std): brings the JPEG size near ImageNet's ~110 KB


def synthetic_jpeg(i: int, seed: int = 0, quality: int = QUALITY, noise: float = NOISE) -> bytes:
    """Image i of the synthetic set: a JPEG of one of IMAGENET_SIZES."""
    rng = random.Random(f"eqrecon-synthetic:{seed}:{i}")
    photos = sorted(PHOTOS.glob("train/*/*.jpg"))
    with Image.open(rng.choice(photos)) as im:
        photo = im.convert("RGB")
    w, h = rng.choice(IMAGENET_SIZES)
    cw = rng.randint(photo.width * 2 // 3, photo.width)
    ch = min(photo.height, round(cw * h / w))
    cw = min(cw, round(ch * w / h))  # a tall target in a wide photo: the height limits the crop
    x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
    px = np.asarray(photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    px += np.random.default_rng(rng.getrandbits(64)).normal(0, noise, px.shape)  # (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(task: tuple[Path, int, int, int, int, float]) -> int:
    root, i, classes, seed, quality, noise = task
    path = root / "train" / f"n{i % classes:08d}" / f"img_{i:06d}.JPEG"
    data = synthetic_jpeg(i, seed, quality, noise)
    path.write_bytes(data)
    return len(data)


def make_imagenet_like(
    root: Path,
    n: int,
    classes: int = 10,
    seed: int = 0,
    quality: int = QUALITY,
    noise: float = NOISE,
    workers: int = 1,
) -> dict:
    """Write n synthetic JPEGs as root/train/<wnid-like class>/*.JPEG -> a description for a result JSON."""
    for c in range(min(classes, n)):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    tasks = [(root, i, classes, seed, quality, noise) for i in range(n)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            sizes = pool.map(_write, tasks, chunksize=16)
    else:
        sizes = [_write(t) for t in tasks]
    return {
        "synthetic": True,
        "images": n,
        "classes": classes,
        "seed": seed,
        "sizes_wh": IMAGENET_SIZES,
        "jpeg_quality": quality,
        "mean_jpeg_kb": round(sum(sizes) / max(n, 1) / 1000, 1),
        "made_from": f"pipeline/demo_photos (random crops, resized, noise σ={noise:g} grey levels)",
    }
