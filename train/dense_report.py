"""How a dense probe reports: the table (protocol above it) and the picture of predictions beside the
ground truth (rows: val images; columns: image, truth, each model at probe seed 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.dense_data import IGNORE, read_image
from train.dense_fit import HeadConfig

TILE = 96  # px: the height of a picture's tiles
METRICS = {
    "seg": ("miou", "macc", "pacc"),
    "retrieval": ("miou", "macc", "pacc"),
    "depth": ("rmse", "absrel", "delta1"),
}


def format_table(record: dict) -> str:
    """The protocol, one `key: value` per line, then one row per model: metric mean ± std over seeds."""
    p = record["protocol"]
    keys = METRICS[p["task"]]
    lines = [f"{k}: {v}" for k, v in p.items()]
    head = f"{'features':<10}" + "".join(f"{k:>18}" for k in keys)
    lines += [head, "-" * len(head)]
    for name, r in record["results"].items():
        lines.append(f"{name:<10}" + "".join(f"{r[k]:>10.4f} ± {r[k + '_std']:.4f}" for k in keys))
    return "\n".join(lines)


def _palette(index: torch.Tensor) -> torch.Tensor:
    """(H, W) class map -> (H, W, 3) uint8: VOC's bit-interleaved colours; 255 (ignore) white."""
    c = index.clamp(0, 254).long()
    rgb = torch.zeros(*c.shape, 3, dtype=torch.long)
    for bit in range(8):
        for ch in range(3):
            rgb[..., ch] |= ((c >> (3 * bit + ch)) & 1) << (7 - bit)
    rgb[index == IGNORE] = 255
    return rgb.byte()


def picture(path: Path, extras: dict, task: str, cfg: HeadConfig) -> None:
    """Rows: val images; columns: image, ground truth, then each model's prediction (seed 0)."""
    from PIL import Image, ImageDraw

    names = list(extras["shown"])
    rows = []
    for i, item in enumerate(extras["val"]):
        row = [read_image(item.pair.image).permute(1, 2, 0)]
        for m in [item.label, *(extras["shown"][n][i] for n in names)]:
            if task == "depth":
                g = ((m - cfg.min_depth) / (cfg.max_depth - cfg.min_depth)).clamp(0, 1)
                row.append((255 * (1 - g)).byte()[..., None].expand(*g.shape, 3))  # near = bright
            else:
                row.append(_palette(m))
        rows.append([Image.fromarray(t.numpy()) for t in row])
    if not rows:
        return
    # Every tile scaled to TILE px high (nearest: class maps stay exact), columns as wide as the widest.
    tiles = [
        [t.resize((max(1, round(TILE * t.width / t.height)), TILE), Image.NEAREST) for t in r] for r in rows
    ]
    width = max(t.width for r in tiles for t in r) + 4
    img = Image.new("RGB", (width * len(tiles[0]), (TILE + 4) * len(tiles) + 12), "white")
    draw = ImageDraw.Draw(img)
    for j, label in enumerate(["image", "truth", *names]):
        draw.text((j * width + 2, 0), label, fill="black")
        for i, r in enumerate(tiles):
            img.paste(r[j], (j * width, 12 + i * (TILE + 4)))
    img.save(path)
