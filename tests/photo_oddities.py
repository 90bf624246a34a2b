"""Real-photo image oddities for converter tests (CMYK, PNG named .JPEG, truncated, ...)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo import PHOTOS

# What the converter must do with each file make_oddities writes: keep the bytes, re-encode them as a
# baseline JPEG, or skip the file with a reason starting with the given word.
KEPT, REENCODED = "kept", "reencoded"


def demo_photo(name: str = "cat/cat_train_00.jpg") -> Image.Image:
    """One of the embedded real photos, decoded (RGB unless it is the greyscale camera class)."""
    with Image.open(PHOTOS / "train" / name) as im:
        return im.copy()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_oddities(folder: Path) -> dict[str, str]:
    """Write ImageNet's real oddities, made from a real photo, into folder -> {file name: expected}.

    expected is KEPT, REENCODED, or "skip:<first word of the reason>".
    """
    folder.mkdir(parents=True, exist_ok=True)
    rgb = demo_photo()
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    good = _jpeg(rgb)
    files = {
        "baseline.JPEG": (good, KEPT),
        "grey.JPEG": (_jpeg(rgb.convert("L")), KEPT),
        "progressive.JPEG": (_jpeg(rgb, progressive=True), KEPT),
        "cmyk.JPEG": (_jpeg(rgb.convert("CMYK")), REENCODED),
        "png_named.JPEG": (_png(rgb), REENCODED),
        "palette.JPEG": (_png(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), REENCODED),
        "grey16.JPEG": (_png(Image.fromarray(grey16)), REENCODED),
        "alpha.png": (_png(rgba), REENCODED),
        "truncated.JPEG": (good[: len(good) // 2], "skip:truncated"),
        "empty.JPEG": (b"", "skip:empty"),
        "garbage.JPEG": (
            bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
            "skip:unreadable",
        ),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}
