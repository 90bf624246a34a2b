"""Small dense sets with labels known by construction, built from real photos, in the plain layout
that `pipeline.dense_data` reads (train/ and val/, each images/ + masks/ or depth/, same stems).

    python -m pipeline.dense_synth OUT --task seg|depth [--train 24] [--val 8] [--size 48x64] [--seed 0]

seg    a scene is a background and 1-3 ellipses or rectangles, each filled with a crop of a real photo
       of one class (the demo photos' 8 classes: pipeline/demo_photos/<split>/<class>/); the mask is
       that class index exactly, with a 1-pixel band of 255 (ignore) along every region boundary, as
       VOC marks its borders. Train scenes take their textures from the train photos, val scenes from
       the val photos, so a probe is scored on photo crops it never saw.
depth  a plane textured with a photo (mirror-tiled, one tile = 1 m), seen by a pinhole camera (focal
       0.9 W) at a random tilt: the plane n·X = h gives every pixel's depth analytically,
       z = h / (n·r) with r = ((u - cx)/f, (v - cy)/f, 1); saved as 16-bit PNG in millimetres (the
       far corners of steep planes pass 10 m, so a valid range matters). Atmospheric haze,
       I = a·texture + (1 - a)·haze with a = exp(-z / 6 m), makes the depth visible in the pixels.

Everything is seeded; the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DataError, UserError, one_line

PHOTOS = Path(__file__).parent / "demo_photos"
HAZE = (0.75, 0.8, 0.85)  # RGB of the haze the depth scenes fade into
HAZE_DIST = 6.0  # metres: a = exp(-z / HAZE_DIST)
TILE = 1.0  # metres of plane per photo tile


@functools.lru_cache(maxsize=4)
def photo_classes(photos: Path = PHOTOS, split: str = "train") -> dict[str, list[np.ndarray]]:
    """{class name: [(H, W, 3) uint8 photos]} of one split of an ImageNet-style photo tree, sorted
    (decoded once per process; callers must not modify the arrays)."""
    folder = photos / split
    classes = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataError(f"{folder}: no class folders of photos to build dense scenes from")
    out = {}
    for c in classes:
        files = sorted(c.glob("*.jpg")) + sorted(c.glob("*.png"))
        if files:
            out[c.name] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return out


def _crop(photo: np.ndarray, hw: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """A random crop (40-100 % of the short side, the target's aspect) resized to hw -> (3, H, W) in [0, 1]."""
    ph, pw = photo.shape[:2]
    h, w = hw
    side = rng.uniform(0.4, 1.0) * min(ph, pw)
    ch, cw = (side, side * w / h) if w <= h else (side * h / w, side)
    ch, cw = min(ph, max(2, round(ch))), min(pw, max(2, round(cw)))
    y, x = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = torch.from_numpy(photo[y : y + ch, x : x + cw].copy()).permute(2, 0, 1).float() / 255
    return F.interpolate(crop[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def seg_scene(
    photos: dict[str, list[np.ndarray]], hw: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """-> image (H, W, 3) uint8 and class-index mask (H, W) uint8 (255 on region boundaries)."""
    names = list(photos)
    h, w = hw
    cls = rng.integers(len(names))
    image = _crop(photos[names[cls]][rng.integers(len(photos[names[cls]]))], hw, rng)
    mask = torch.full(hw, int(cls), dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for _ in range(rng.integers(1, 4)):
        cls = rng.integers(len(names))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(0.15, 0.4) * h, rng.uniform(0.15, 0.4) * w
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
        texture = _crop(photos[names[cls]][rng.integers(len(photos[names[cls]]))], hw, rng)
        image = torch.where(inside, texture, image)
        mask[inside] = int(cls)
    # A pixel whose 4-neighbourhood holds another class is a boundary pixel: ignore (255).
    m = F.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    centre = m[1:-1, 1:-1]
    edge = (
        (m[:-2, 1:-1] != centre)
        | (m[2:, 1:-1] != centre)
        | (m[1:-1, :-2] != centre)
        | (m[1:-1, 2:] != centre)
    )
    mask[edge] = 255
    return _to_uint8(image), mask.numpy()


def plane_depth(hw: tuple[int, int], normal: np.ndarray, dist: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth z (H, W) in metres of the plane n·X = dist (n unit) and the camera rays r (H, W, 3)."""
    h, w = hw
    f = 0.9 * w
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    rays = torch.stack([(u - w / 2) / f, (v - h / 2) / f, torch.ones(h, w)], dim=-1).double()  # (H, W, 3)
    n = torch.from_numpy(normal).double()
    return dist / (rays @ n), rays


def depth_scene(
    photos: dict[str, list[np.ndarray]], hw: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """-> image (H, W, 3) uint8 and depth (H, W) uint16 in millimetres of a hazy textured plane."""
    normal = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), 1.0])
    normal /= np.linalg.norm(normal)  # n·r >= 1 - 0.8·(0.56 + 0.42) > 0 over the image: no sky
    z, rays = plane_depth(hw, normal, rng.uniform(1.0, 5.0) * normal[2])
    points = z[..., None] * rays  # (H, W, 3) on the plane
    e1 = np.cross(normal, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    uv = torch.stack([points @ torch.from_numpy(e) for e in (e1, e2)], dim=-1) / TILE  # (H, W, 2)
    uv = uv + torch.from_numpy(rng.uniform(0, 2, size=2))
    grid = 1 - (torch.remainder(uv, 2) - 1).abs()  # mirror tiling: a continuous texture, in [0, 1]
    names = list(photos)
    photo = photos[names[rng.integers(len(names))]]
    tex = torch.from_numpy(photo[rng.integers(len(photo))].copy()).permute(2, 0, 1).float()[None] / 255
    image = F.grid_sample(tex, (grid * 2 - 1).float()[None], mode="bilinear", align_corners=False)[0]
    a = torch.exp(-z / HAZE_DIST).float()
    image = a * image + (1 - a) * torch.tensor(HAZE).view(3, 1, 1)
    depth_mm = (z * 1000).round().clamp(1, 65535).numpy().astype(np.uint16)
    return _to_uint8(image), depth_mm


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def build(
    out: str | Path,
    task: str,
    n_train: int = 24,
    n_val: int = 8,
    hw: tuple[int, int] = (48, 64),
    seed: int = 0,
    photos: Path = PHOTOS,
) -> Path:
    """Write a plain-layout dense set (task seg or depth) into `out`; -> out."""
    if task not in ("seg", "depth"):
        raise UserError(f"--task {task!r}: choose from seg, depth")
    out = Path(out)
    names: list[str] = []
    for split, n in (("train", n_train), ("val", n_val)):
        src = photo_classes(photos, split)
        names = names or list(src)
        if list(src) != names:
            raise DataError(f"{photos}: the train and val photo classes differ ({names} vs {list(src)})")
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        label_dir = out / split / ("masks" if task == "seg" else "depth")
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = (seg_scene if task == "seg" else depth_scene)(src, hw, rng)
            Image.fromarray(image).save(out / split / "images" / f"{i:05d}.png")
            Image.fromarray(label).save(label_dir / f"{i:05d}.png")
    if task == "seg":
        (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.dense_synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--task", required=True, choices=("seg", "depth"))
    ap.add_argument("--train", type=int, default=24, help="train scenes")
    ap.add_argument("--val", type=int, default=8, help="val scenes")
    ap.add_argument("--size", default="48x64", help="HxW of every scene")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        h, _, w = args.size.partition("x")
        if not (h.isdigit() and w.isdigit()) or min(int(h), int(w)) < 8:
            raise UserError(f"--size {args.size!r}: give HxW, both at least 8, e.g. 48x64")
        build(args.out, args.task, args.train, args.val, (int(h), int(w)), args.seed)
    except UserError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    print(f"wrote {args.train} train + {args.val} val {args.task} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
