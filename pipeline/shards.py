"""The shard format and the one rule that splits a split's samples over ranks and epochs.

Format (written by `pipeline.convert`, read by both loaders, the probes and `convert --verify`):

    DIR/dataset.json        {"format", "labeled", "classes" (index order; [] when unlabeled), "shards":
                             [{"name", "split", "count", "sha256", ...}], ...}; a shard whose every
                             file was skipped has count 0 and no tar
    DIR/{split}-{i:06d}.tar one sample = `<key>.jpg` (JPEG bytes) then `<key>.cls` (the class index as
                             ASCII digits), in that order, samples shuffled when written; in an
                             unlabeled dataset (`"labeled": false`, `dataset_is_labeled`) `<key>.jpg`
                             alone, and loaders give label -1
    DIR/{split}-{i:06d}.idx DALI's webdataset index (wds2idx v1.2): `v1.2 <samples>`, then one line per
                             sample, `<ext> <data offset> <size> <member name>` for each of its members

Sharding policy (both loaders, so `len()` and a checkpoint's position mean the same in both). The
split's samples, concatenated in dataset.json order, are N in all. In epoch e, rank r of `world` reads
the contiguous range of part (r + e) % world of the N samples cut into `world` parts at N·i // world
(`rank_range`, DALI's reader rule for shard_id/num_shards; the rotation moves ranks over the data
between epochs). Every rank yields `epoch_length` = (N // world) // b full batches of b = global
batch // world, the same on every rank, so DDP never waits on a rank that ran dry; what is left of a
range is dropped (fewer than world·b + world samples an epoch).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipeline.errors import DataError, ShardError

if TYPE_CHECKING:  # torch is imported lazily so `python -m pipeline.convert` starts fast
    import torch

META = "dataset.json"
CLS_BYTES = 16  # the ASCII class index is padded to this many bytes to batch it (DALI)
VERIFY_HINT = "check the folder with `python -m pipeline.convert --verify {}`"


class Shard(NamedTuple):
    """One tar of a split, as dataset.json lists it."""

    path: Path
    count: int
    sha256: str | None

    @property
    def index(self) -> Path:
        return self.path.with_suffix(".idx")


# ------------------------------------------------------------------------------------ listing a split


def load_meta(data_dir: str | Path) -> dict:
    """dataset.json of a converted folder; a DataError naming the file when it is missing or unreadable."""
    path = Path(data_dir) / META
    hint = f"is {str(Path(data_dir))!r} a folder written by pipeline.convert?"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise DataError(f"{path} is missing or unreadable ({reason}); {hint}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise DataError(f"{path} lists no shards; {hint}")
    return meta


def dataset_is_labeled(meta: dict) -> bool:
    """Whether dataset.json's samples carry class labels (`cls` members). `"labeled"` says so; a
    dataset.json written before that key existed is labeled when it lists classes. A DataError when the
    key is not a boolean (a hand-edited file): guessing would feed -1 labels to a classifier."""
    labeled = meta.get("labeled", bool(meta.get("classes")))
    if not isinstance(labeled, bool):
        raise DataError(f'{META}: "labeled" is {labeled!r}, not true or false; re-run pipeline.convert')
    return labeled


def split_shards(data_dir: str | Path, split: str, indexed: bool = False) -> list[Shard]:
    """The split's non-empty shards in dataset.json order; each tar must exist, and with `indexed` its
    DALI index too, checked against the tar (`check_index`). Errors name the file."""
    data_dir = Path(data_dir)
    records = load_meta(data_dir)["shards"]
    try:
        shards = [
            Shard(data_dir / r["name"], int(r["count"]), r.get("sha256"))
            for r in records
            if r["split"] == split and int(r["count"]) > 0
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{data_dir / META}: a shard record is malformed ({e!r}); re-run pipeline.convert"
        ) from None
    if not shards:
        have = sorted({str(r.get("split")) for r in records})
        raise DataError(f"{data_dir} has no {split!r} shards (splits present: {', '.join(have) or 'none'})")
    for shard in shards:
        if not shard.path.is_file():
            raise ShardError(
                f"shard {shard.path} listed in {META} is missing; re-run pipeline.convert into "
                f"{data_dir} to rewrite it"
            )
        if indexed:
            check_index(shard)
    return shards


def check_index(shard: Shard) -> int:
    """The DALI index must exist, count the shard's samples and fit inside the tar (a truncated tar is
    caught here, before a reader opens it) -> the tar size the index needs."""
    try:
        lines = shard.index.read_text().splitlines()
    except FileNotFoundError:
        raise ShardError(
            f"index {shard.index} of shard {shard.path.name} is missing; re-run pipeline.convert"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"index {shard.index} is unreadable ({e}); re-run pipeline.convert") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[1].isdigit() or len(lines) - 1 != int(head[1]):
        raise ShardError(
            f"{shard.index}: not a valid DALI webdataset index (expected 'v1.2 <samples>' and one "
            "line per sample); re-run pipeline.convert"
        )
    n = int(head[1])
    if n != shard.count:
        raise ShardError(
            f"{shard.index}: indexes {n} samples, {META} says {shard.count} for {shard.path.name}"
        )
    fields = lines[-1].split() if n else []
    end = max((int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields) - 3, 4)), default=0)
    check_sizes([shard], [end])
    return end


def check_sizes(shards: list[Shard], needed: list[int]) -> None:
    """Every tar exists and is at least as long as its index needs (`check_index`'s result): cheap (one
    stat per tar), so a loader runs it before each epoch and a shard damaged during a run is named."""
    for shard, end in zip(shards, needed):
        try:
            size = shard.path.stat().st_size
        except FileNotFoundError:
            raise ShardError(
                f"shard {shard.path} is missing; re-run pipeline.convert into {shard.path.parent}"
            ) from None
        if end > size:
            raise ShardError(
                f"shard {shard.path} is truncated: {size} bytes, its index needs {end}; "
                "re-run pipeline.convert"
            )


# ---------------------------------------------------------------------------------- samples and labels


def parse_label(raw: bytes, where: str) -> int:
    """A `cls` member (ASCII digits) -> class index; a ShardError naming `where` otherwise."""
    text = raw.decode("ascii", "replace")
    if not (text.isascii() and text.isdigit()):
        raise ShardError(f"{where}: cls {raw[:20]!r} is not an ASCII class index")
    return int(text)


def parse_labels(cls_bytes: torch.Tensor) -> torch.Tensor:
    """Batched `parse_label` for DALI: (B, CLS_BYTES) uint8 ASCII, zero-padded -> (B,) int64; -1 where
    there are no leading digits."""
    import torch

    d = cls_bytes.long() - ord("0")
    leading = torch.cumprod(((d >= 0) & (d <= 9)).long(), dim=1)  # 1 while still in the leading digits
    n = leading.sum(dim=1, keepdim=True)
    power = (n - 1 - torch.arange(d.shape[1], device=d.device)).clamp(min=0)
    value = (d * leading * 10**power).sum(dim=1)
    return torch.where(n[:, 0] > 0, value, torch.full_like(value, -1))


def read_shard(
    path: str | Path, expected: int | None = None, start: int = 0, stop: int | None = None
) -> Iterator[dict]:
    """Samples {__key__, __url__, jpg, cls} number start..stop-1 of one tar, in tar order (earlier ones
    are read, not returned). Read to its end, the tar must hold `expected` samples (dataset.json's count).
    Damage is a ShardError naming the tar."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = Path(path)
    n = 0
    try:
        with open(path, "rb") as f:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])):
                if stop is not None and n >= stop:
                    return
                if n >= start:
                    yield sample
                n += 1
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing: re-run pipeline.convert into {path.parent}") from None
    except (tarfile.TarError, OSError, ValueError) as e:
        reason = str(e.args[0] if e.args else e).split(" @ ")[0]  # webdataset appends " @ <stream>"
        raise ShardError(f"shard {path} is corrupt ({reason}); {VERIFY_HINT.format(path.parent)}") from None
    if expected is not None and n != expected:
        raise ShardError(
            f"shard {path} holds {n} samples but {META} says {expected}; {VERIFY_HINT.format(path.parent)}"
        )


def member_key_ext(name: str) -> tuple[str, str]:
    """A tar member name -> (sample key, extension): the extension starts at the basename's first dot."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_text(members: list[tuple[str, int, int]]) -> str:
    """The DALI index of a tar whose members are [(name, data offset, size)] in tar order."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        key, ext = member_key_ext(name)
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(f"{ext} {offset} {size} {name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def verify_shard(
    path: str | Path, n_classes: int | None = None, sha256: str | None = None, labeled: bool = True
) -> list[tuple[str, int]]:
    """Check one shard completely -> [(key, label)] in tar order (label -1 when not `labeled`): the
    sha256 of dataset.json, the tar structure (jpg then cls per sample, or jpg alone when not `labeled`;
    nothing truncated, end-of-archive marker), labels < n_classes, and the index agreeing with the tar
    byte for byte. A ShardError names the shard and the fault."""
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
        idx_text = path.with_suffix(".idx").read_text()
    except OSError as e:
        raise ShardError(f"{name}: cannot read shard or its index: {e.strerror}: {e.filename}") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"{name}: content differs from {META} (sha256 mismatch): the shard is corrupted")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = tar.getmembers()
    except tarfile.TarError as e:
        raise ShardError(f"{name}: not a valid tar archive: {e}") from None
    members, samples = [], []
    for info in infos:
        end = info.offset_data + info.size
        if not info.isfile() or end > len(data):
            raise ShardError(
                f"{name}: member {info.name!r} is {'truncated' if info.isfile() else 'not a file'}"
            )
        members.append((info.name, info.offset_data, info.size))
        key, ext = member_key_ext(info.name)
        if ext == "jpg":
            if info.size == 0:
                raise ShardError(f"{name}: {info.name!r} is empty")
            samples.append([key, None if labeled else -1])
        elif labeled and ext == "cls" and samples and samples[-1][0] == key and samples[-1][1] is None:
            label = parse_label(data[info.offset_data : end], f"{name}: {info.name!r}")
            if n_classes is not None and label >= n_classes:
                raise ShardError(f"{name}: {info.name!r} holds {label}, not a class index < {n_classes}")
            samples[-1][1] = label
        else:
            want = "<key>.jpg then <key>.cls" if labeled else "<key>.jpg alone: the dataset is unlabeled"
            raise ShardError(f"{name}: unexpected member {info.name!r} (want {want})")
    if samples and samples[-1][1] is None:
        raise ShardError(f"{name}: sample {samples[-1][0]!r} has no .cls")
    tail = max((o + (-(-s // 512) * 512) for _, o, s in members), default=0)
    if data[tail : tail + 1024] != bytes(1024):
        raise ShardError(f"{name}: tar has no end-of-archive marker (truncated?)")
    if idx_text != index_text(members):
        raise ShardError(f"{name}: index {path.with_suffix('.idx').name} disagrees with the tar")
    return [(k, c) for k, c in samples]


# ------------------------------------------------------------------------------ ranks and epochs


def rank_part(rank: int, world_size: int, epoch: int) -> int:
    """Which of the `world_size` parts of the samples rank reads in epoch (DALI's reader shard_id)."""
    return (rank + epoch) % world_size


def rank_range(total: int, rank: int, world_size: int, epoch: int) -> tuple[int, int]:
    """The samples [lo, hi) of the split (dataset.json order) that rank reads in epoch."""
    part = rank_part(rank, world_size, epoch)
    return total * part // world_size, total * (part + 1) // world_size


def epoch_length(total: int, world_size: int, local_batch: int) -> int:
    """Full batches per epoch, the same on every rank: the smallest range, floor(N / world), cut into
    batches of local_batch."""
    return total // world_size // local_batch


def pieces(shards: list[Shard], lo: int, hi: int) -> list[tuple[Shard, int, int]]:
    """The sample range [lo, hi) of the concatenated shards -> [(shard, start, stop)] within each tar."""
    out, first = [], 0
    for shard in shards:
        a, z = max(lo - first, 0), min(hi - first, shard.count)
        if a < z:
            out.append((shard, a, z))
        first += shard.count
    return out


__all__ = [
    "CLS_BYTES",
    "META",
    "Shard",
    "check_index",
    "check_sizes",
    "dataset_is_labeled",
    "epoch_length",
    "index_text",
    "load_meta",
    "member_key_ext",
    "parse_label",
    "parse_labels",
    "pieces",
    "rank_part",
    "rank_range",
    "read_shard",
    "split_shards",
    "verify_shard",
]
