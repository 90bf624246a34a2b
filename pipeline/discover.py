"""Source discovery for the converter: which files of a folder become samples, and their labels.

    found = discover(Path(SRC), "all", exclude=os.path.realpath(OUT), labels="auto")

Labelled layouts (labels="folders"): SRC/train/<wnid>/*, SRC/val/<wnid>/*, a flat SRC/val/* labelled by
SRC/LOC_val_solution.csv, or SRC/<class>/* (converted as split "train"). Class index = position of the
folder name in the sorted train class folders. Unlabeled (labels="none"): every image below SRC (or
below SRC/train and SRC/val, which stay splits) is a sample with label -1, whatever folders hold it.
labels="auto" picks folders for a train/ or val/ layout or an ImageNet-style tree (images exactly one
folder deep, in two or more folders), else none, and says why. Every entry that does not become a
sample is returned in `skipped` with its reason (non-UTF-8 name, dangling symlink, symlink loop, pipe,
unreadable file or folder, unknown class); non-image files and hidden entries are returned in
`ignored`. The output folder, and any folder holding a converter's lock file (an earlier output), is
never read as source.
"""

from __future__ import annotations

import csv
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import ConvertError

SPLITS = ("train", "val")
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
VAL_CSV = "LOC_val_solution.csv"
LABELS = ("auto", "folders", "none")  # --labels: see discover()
LOCK = ".convert.lock"  # flock'ed by the running converter; holds its pid, host and start time


@dataclass(frozen=True)
class Item:
    split: str
    rel: str  # path relative to SRC, posix, for messages and dataset.json
    key: str  # tar-safe, unique within the split
    label: int  # class index; -1 when the dataset is unlabeled


# ---------------------------------------------------------------------------------------- discovery


def _printable(rel: str) -> str:
    """rel with the bytes of a non-UTF-8 name (surrogate-escaped by Python) shown as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir surrogate-escapes bytes that are not UTF-8
        return False


def _entries(folder: str) -> list[os.DirEntry]:
    return sorted(os.scandir(folder), key=lambda e: e.name)


@dataclass
class _Listing:
    """What a scan found below a folder, paths relative to it (posix, in name order)."""

    files: list[str] = field(default_factory=list)  # regular files, symlinks to them included
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of what cannot be read
    hidden: list[str] = field(default_factory=list)  # dot-entries, not entered ("train/.git/")


def _scan(
    folder: str,
    real: str,
    exclude: str,
    found: _Listing,
    prefix: str = "",
    ancestors: frozenset[str] = frozenset(),
) -> _Listing:
    """List folder's tree into found. real is folder's resolved path; converter outputs (see
    _is_output) are left out."""
    # plain strings: pathlib costs over a minute on ImageNet's 1.3M files
    ancestors |= {real}
    try:
        entries = _entries(folder)
    except OSError as e:
        found.problems.append((prefix.rstrip("/"), f"unreadable folder: {e.strerror}"))
        return found
    for entry in entries:
        rel = prefix + entry.name
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()  # d_type, no system call unless a symlink
        except OSError:  # ELOOP, a symlink to itself: _not_a_file says so
            is_dir = is_file = False
        if not _utf8(entry.name):
            what = "folder" if is_dir else "file"
            found.problems.append(
                (_printable(rel), f"{what} name is not valid UTF-8: rename it to convert it")
            )
        elif entry.name.startswith("."):  # .DS_Store, ._x.JPEG (macOS resource forks), .git
            found.hidden.append(rel + "/" * is_dir)
        elif is_dir:
            sub = os.path.realpath(entry.path) if entry.is_symlink() else f"{real}/{entry.name}"
            if _is_output(entry.path, sub, exclude):
                continue
            if sub in ancestors:  # the only way to a loop: hard links to folders do not exist
                found.problems.append((rel, f"symlink loop: leads back to {sub}"))
                continue
            _scan(entry.path, sub, exclude, found, f"{rel}/", ancestors)
        elif is_file:
            found.files.append(rel)
        else:
            found.problems.append((rel, _not_a_file(entry)))
    return found


def _not_a_file(entry: os.DirEntry) -> str:
    """Why an entry that is neither a folder nor a regular file (after following symlinks) is skipped."""
    if not entry.is_symlink():
        return "not a regular file (a socket, pipe or device)"
    target = os.readlink(entry.path)
    try:
        os.stat(entry.path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symlink loop: {target!r} never reaches a file"
        if e.errno == errno.ENOENT:
            return f"dangling symlink: its target {target!r} does not exist"
        return f"unreadable symlink to {target!r}: {e.strerror}"
    return f"symlink to {target!r}, which is not a regular file"


def _class_dirs(folder: Path, exclude: str) -> list[str]:
    try:
        entries = _entries(str(folder))
    except OSError as e:
        raise ConvertError(f"cannot read {str(folder)!r}: {e.strerror}") from None
    return [
        e.name
        for e in entries
        if _is_dir(e)
        and _utf8(e.name)
        and not e.name.startswith(".")
        and not _is_output(e.path, os.path.realpath(e.path), exclude)
    ]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: a symlink to itself is no folder
        return False


def _is_output(folder: str, real: str, exclude: str) -> bool:
    """Is folder this run's --out (resolved: exclude) or another converter's output (it holds a lock
    file)? Neither is source data: as a class it would shift every later label by one."""
    return real == exclude or os.path.exists(os.path.join(folder, LOCK))


def _read_val_csv(path: Path) -> dict[str, str]:
    """LOC_val_solution.csv: `ImageId,PredictionString` with the wnid as first token of the string."""
    labels = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for row in rows:
        try:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError, AttributeError):
            raise ConvertError(f"{path}: expected columns ImageId,PredictionString, got row {row}") from None
    return labels


def _tar_safe_key(stem: str) -> str:
    # DALI's index and webdataset both cut the key at the first dot of the last path component, and
    # DALI's index is space-separated: keep only characters that survive both.
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem)


class Discovered(NamedTuple):
    """What `discover` found: the samples, and every entry that does not become one."""

    classes: list[str]  # class names in index order; [] when unlabeled
    items: dict[str, list[Item]]  # per split; Item.label is -1 when unlabeled
    skipped: list[dict]  # {"split", "path", "shard": None, "reason"} of entries skipped before decoding
    ignored: list[str]  # non-image files and hidden entries
    labeled: bool
    labels_why: str  # for the summary: which labels and why (auto's choice)


def _looks_like_class_folders(listing: _Listing) -> str | None:
    """None when the images of a bare folder (no train/ or val/) lie in an ImageNet-style tree:
    <class>/<image>, in at least two class folders; else why not (auto then converts it unlabeled)."""
    images = [rel for rel in listing.files if os.path.splitext(rel)[1].lower() in IMAGE_EXTS]
    if not images:
        return "no images"
    if loose := [rel for rel in images if "/" not in rel]:
        return f"{len(loose)} image(s) lie directly in the folder ({loose[0]})"
    if deep := [rel for rel in images if rel.count("/") > 1]:
        return f"{len(deep)} image(s) lie more than one folder deep ({deep[0]})"
    folders = {rel.split("/", 1)[0] for rel in images}
    if len(folders) < 2:
        return f"only one folder holds images ({next(iter(folders))}/)"
    return None


def discover(src: Path, split: str, exclude: str = "", labels: str = "auto") -> Discovered:
    """The samples of src and everything that does not become one (see `Discovered`).

    labels: "folders" (class folders, as ImageNet), "none" (every image is an unlabeled sample, folders
    are only folders) or "auto" (folders when src has train/ or val/, or is an ImageNet-style tree of
    at least two class folders; else none). exclude: resolved path of a folder to leave out, the
    converter's own --out when it lies in src."""
    if labels not in LABELS:
        raise ConvertError(f"--labels must be one of {', '.join(LABELS)}, not {labels!r}")
    if not src.is_dir():
        raise ConvertError(f"--src {str(src)!r} is not a folder")
    split_dirs = {
        s: src / s
        for s in SPLITS
        if (src / s).is_dir() and not _is_output(str(src / s), os.path.realpath(src / s), exclude)
    }
    bare = not split_dirs
    if bare:  # a folder of class folders, or of images (converted as split "train")
        split_dirs = {"train": src}
    wanted = [s for s in SPLITS if split in (s, "all") and s in split_dirs]
    if not wanted:
        raise ConvertError(f"{str(src)!r} has no {split}/ folder (found: {', '.join(split_dirs)})")
    # each split folder is scanned once (ImageNet's train/ holds 1.3M files)
    listings = {
        s: _scan(str(split_dirs[s]), os.path.realpath(split_dirs[s]), exclude, _Listing()) for s in wanted
    }

    if labels == "auto" and bare:
        why_not = _looks_like_class_folders(listings["train"])
        labeled = why_not is None
        why = (
            "class folders (auto: an ImageNet-style tree; --labels none ignores them)"
            if labeled
            else f"none (auto: not a tree of class folders: {why_not}; --labels folders demands one)"
        )
    else:
        labeled = labels != "none"
        why = {
            "auto": "class folders (auto: train/ or val/ folders; --labels none ignores them)",
            "folders": "class folders (--labels folders)",
            "none": "none (--labels none: every image is a sample)",
        }[labels]
    if labeled:
        classes, label_of = _class_labels(src, split_dirs, exclude, bare)
    else:
        classes, label_of = [], lambda root, rel_split: (-1, None)

    items, skipped, ignored = {}, [], []
    for s in wanted:
        root, listing, seen, found = split_dirs[s], listings[s], set(), []
        prefix = "" if root == src else f"{s}/"
        skipped += [
            {"split": s, "path": prefix + rel, "shard": None, "reason": r} for rel, r in listing.problems
        ]
        ignored += [prefix + rel for rel in listing.hidden]
        for rel_split in listing.files:
            rel = prefix + rel_split
            stem, ext = os.path.splitext(rel_split)
            if ext.lower() not in IMAGE_EXTS:
                ignored.append(rel)
                continue
            label, reason = label_of(root, rel_split)
            if reason is not None:
                skipped.append({"split": s, "path": rel, "shard": None, "reason": reason})
                continue
            key = base = _tar_safe_key(stem)
            n = 0
            while key in seen:  # e.g. a.JPEG and a.png, or names differing only in unsafe characters
                n += 1
                key = f"{base}_{n}"
            seen.add(key)
            found.append(Item(s, rel, key, label))
        items[s] = found
    if not any(items.values()):
        raise ConvertError(f"no images found under {str(src)!r} for split {split!r}")
    return Discovered(classes, items, skipped, ignored, labeled, why)


def _class_labels(src: Path, split_dirs: dict[str, Path], exclude: str, bare: bool):
    """-> (classes, label_of(split root, path below it) -> (class index, None) or (-1, why skipped))."""
    hint = "; to convert it without labels, pass --labels none"
    if bare and not _class_dirs(src, exclude):
        raise ConvertError(f"{str(src)!r} has no train/ or val/ folder and no class folders{hint}")
    csv_path = src / VAL_CSV
    val_labels = _read_val_csv(csv_path) if csv_path.is_file() else None
    if "train" in split_dirs:
        classes = _class_dirs(split_dirs["train"], exclude)
    elif _class_dirs(split_dirs["val"], exclude):
        classes = _class_dirs(split_dirs["val"], exclude)
    else:
        classes = sorted(set(val_labels.values())) if val_labels else []
    if not classes:
        raise ConvertError(f"no class folders in {str(split_dirs.get('train', src))!r}{hint}")
    index = {c: i for i, c in enumerate(classes)}

    def label_of(root: Path, rel_split: str) -> tuple[int, str | None]:
        stem = os.path.splitext(rel_split)[0]
        if "/" not in rel_split:  # flat val: label from the CSV
            if val_labels is None:
                raise ConvertError(
                    f"{root} holds images directly ({rel_split}) but {csv_path} is missing{hint}"
                )
            wnid = val_labels.get(stem)
            reason = (
                f"no label: {stem!r} is not in {VAL_CSV}"
                if wnid is None
                else f"unknown class: {VAL_CSV} labels it {wnid!r}, which is not a train class"
            )
        else:
            wnid = rel_split.split("/", 1)[0]
            reason = f"unknown class: folder {wnid!r} is not a train class"
        return (index[wnid], None) if wnid in index else (-1, reason)

    return classes, label_of
