"""The embedded demo photos (pipeline/demo_photos), converted once into shards with the real converter.

`ensure_demo_shards()` is what the trainer reads when no data folder is configured: it converts the
photos into a cache folder on first use and re-uses that folder while it is complete and the photos
are unchanged (a fingerprint of the photo files is kept beside dataset.json).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from pipeline.convert import convert, verify
from pipeline.errors import ConvertError, ShardError
from pipeline.shard_write import FORMAT

PHOTOS = Path(__file__).parent / "demo_photos"
SHARD_SIZE = 8  # several shards per split, so rank/worker sharding is exercised even on the demo
FINGERPRINT = "demo-fingerprint.txt"


def default_cache_dir() -> Path:
    if os.environ.get("EQRECON_CACHE"):
        return Path(os.environ["EQRECON_CACHE"]).expanduser() / "demo-shards"
    return Path(__file__).resolve().parent.parent / ".cache" / "demo-shards"


def photos_fingerprint() -> str:
    """Hash of every photo's path and bytes, and of the converter's shard settings."""
    h = hashlib.sha256(f"{FORMAT} shard_size={SHARD_SIZE}\n".encode())
    for path in sorted(PHOTOS.rglob("*.jpg")):
        h.update(path.relative_to(PHOTOS).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@contextmanager
def _exclusive(folder: Path):
    """Hold an exclusive lock on folder: every torchrun rank calls ensure_demo_shards at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: single-process use only
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_shards(cache_dir: str | Path | None = None) -> Path:
    """-> folder of demo shards (train and val), converting the embedded photos if needed."""
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stamp = out / FINGERPRINT
    want = photos_fingerprint()
    with _exclusive(out):
        if stamp.is_file() and stamp.read_text().strip() == want:
            try:
                verify(out)
                return out
            except (ConvertError, ShardError):
                pass  # damaged cache: convert again (finished shards that still verify are kept)
        stamp.unlink(missing_ok=True)
        convert(PHOTOS, out, split="all", shard_size=SHARD_SIZE, workers=1, seed=0, strict=True, quiet=True)
        stamp.write_text(want + "\n")
    return out
