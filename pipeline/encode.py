"""One source file -> the JPEG bytes a shard stores. Every image is fully decoded once: baseline
RGB/greyscale JPEGs are kept byte for byte, everything else decodable (CMYK, PNG named .JPEG, palette,
16-bit, transparency) is re-encoded as a baseline JPEG, and what cannot be decoded raises Skip with
the reason the converter records (pipeline/convert.py)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

JPEG_QUALITY = 95  # of re-encoded images; part of every shard's plan hash


class Skip(Exception):
    """An input file that cannot become a sample; the message is the recorded reason."""


def _to_baseline_jpeg(im: Image.Image) -> bytes:
    grey = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit greyscale: keep the top 8 bits (Pillow's own convert("L") would clip at 255)
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("L" if grey else "RGB")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("L" if grey else "RGB")  # CMYK, P, 1, YCbCr, LAB, HSV
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, progressive=False, optimize=False)
    return buf.getvalue()


def encode_image(data: bytes) -> tuple[bytes, str | None]:
    """Fully decode data -> (JPEG bytes to store, re-encoding note or None if stored as is)."""
    if not data:
        raise Skip("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. corrupt EXIF: the pixels are what matters
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except Image.UnidentifiedImageError:
            raise Skip("unreadable: not a recognised image format") from None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... on bad data
            kind = "truncated" if "truncated" in str(e) else "undecodable"
            raise Skip(f"{kind}: {type(e).__name__}: {e}") from None
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return data, None
        note = f"{im.format} {im.mode}"
        try:
            return _to_baseline_jpeg(im), note
        except Exception as e:  # noqa: BLE001 - same: any failure here is a property of the file
            raise Skip(f"undecodable: cannot convert {note} to JPEG: {e}") from None
