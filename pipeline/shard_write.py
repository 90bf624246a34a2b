"""Writing one shard: which samples go where (`plan_shards`), and `write_shard`, what each converter
worker runs: encode every sample (pipeline/encode.py), write the tar and its DALI index atomically,
record each skipped file with its reason, and turn an OSError of the output into one ConvertError.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

from pipeline.discover import Item
from pipeline.encode import JPEG_QUALITY, Skip, encode_image
from pipeline.errors import ConvertError
from pipeline.shards import index_text

FORMAT = "eqrecon-shards/1"
MTIME = 1_700_000_000  # fixed member mtime keeps shard bytes (and so their sha256) reproducible


def plan_shards(
    items: list[Item], split: str, shard_size: int, seed: int
) -> list[tuple[str, list[Item], str]]:
    """-> [(shard name, items in write order, plan hash)]; a seeded shuffle of the sorted items."""
    order = sorted(items, key=lambda it: it.rel)
    random.Random(f"eqrecon:{seed}:{split}").shuffle(order)
    shards = []
    for i in range(0, len(order), shard_size):
        chunk = order[i : i + shard_size]
        h = hashlib.sha256(f"{FORMAT} q{JPEG_QUALITY}\n".encode())
        for it in chunk:
            h.update(f"{it.key}\t{it.label}\t{it.rel}\n".encode())
        shards.append((f"{split}-{i // shard_size:06d}.tar", chunk, h.hexdigest()[:16]))
    return shards


# ------------------------------------------------------------------------------------ shard writing


def _write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> list[tuple[str, int, int]]:
    """Write samples (key, jpeg, label; -1: unlabeled, no .cls) -> [(member name, data offset, size)]."""
    members = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, jpeg, label in samples:
            cls = [("cls", str(label).encode())] if label >= 0 else []
            for ext, payload in [("jpg", jpeg), *cls]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), MTIME, 0o644
                tar.addfile(info, io.BytesIO(payload))
                # tar.offset is now past the data, padded to 512 bytes
                members.append((info.name, tar.offset - (-(-len(payload) // 512) * 512), len(payload)))
    return members


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_shard(task: tuple[Path, str, str, str, list[Item]]) -> dict:
    """Encode one planned shard and write it atomically -> its record (also run in worker processes)."""
    out, src, name, plan, items = task
    samples, skipped, reencoded = [], [], []
    for it in items:
        try:
            data = (Path(src) / it.rel).read_bytes()
            jpeg, note = encode_image(data)
        except Skip as e:
            skipped.append({"split": it.split, "path": it.rel, "shard": name, "reason": str(e)})
            continue
        except OSError as e:
            skipped.append(
                {"split": it.split, "path": it.rel, "shard": name, "reason": f"unreadable: {e.strerror or e}"}
            )
            continue
        if note:
            reencoded.append({"path": it.rel, "was": note})
        samples.append((it.key, jpeg, it.label))
    record = {
        "name": name,
        "split": items[0].split,
        "count": len(samples),
        "bytes": 0,
        "sha256": None,
        "plan": plan,
        "skipped": skipped,
        "reencoded": reencoded,
    }
    if samples:  # a shard whose every file was skipped is recorded but not written
        tar, idx = out / name, (out / name).with_suffix(".idx")
        tar_tmp, idx_tmp = tar.with_name(name + ".tmp"), idx.with_name(idx.name + ".tmp")
        try:
            members = _write_tar(tar_tmp, samples)
            idx_tmp.write_text(index_text(members))
            os.replace(idx_tmp, idx)
            os.replace(tar_tmp, tar)  # the .tar appearing marks the shard complete
        except OSError as e:
            error = output_error(e, tar_tmp)
            if error is None:
                raise
            for tmp in (tar_tmp, idx_tmp):  # give a full disk its space back
                tmp.unlink(missing_ok=True)
            raise error from None
        record.update(bytes=tar.stat().st_size, sha256=_sha256(tar))
    return record


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: a file-size limit (ulimit -f)
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def output_error(e: OSError, path: str | Path) -> ConvertError | None:
    """The one-line error for an OS error writing path (None: not the user's to fix, keep the traceback).

    Raised in worker processes too: a ConvertError pickles back to the parent as itself."""
    if e.errno in _DISK_FULL:
        hint = "free some space (or raise the file-size limit) or choose another --out, then re-run to resume"
    elif e.errno in _NOT_WRITABLE:
        hint = "the output folder is not writable: choose another --out"
    elif e.errno in _NOT_A_FOLDER:
        hint = "--out and the folders above it must be folders, not files"
    else:
        return None
    return ConvertError(f"cannot write {e.filename or path}: {e.strerror}; {hint}")
