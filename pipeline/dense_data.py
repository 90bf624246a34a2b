"""Readers of the dense sets users have: (image, label) file pairs per split, and the label decoders.

    ds = open_dense("VOCdevkit/VOC2012", kind="seg")        # layout detected; or layout="voc"
    image = read_image(ds.val[0].image)                     # (3, H, W) uint8
    mask = read_mask(ds.val[0].label, image.shape[1:], ds)  # (H, W) int64, 255 = ignore

Layouts (split "train" and "val"; `root` may be the folder named or its parent where noted):
  voc     Pascal VOC 2012: JPEGImages/<stem>.jpg, SegmentationClass/<stem>.png (palette PNG whose
          indices are the classes, 255 = border), ImageSets/Segmentation/{train,val}.txt; 21 classes.
          root: VOC2012, or VOCdevkit above it.
  ade20k  ADE20K SceneParsing (ADEChallengeData2016): images/{training,validation}/<stem>.jpg,
          annotations/{training,validation}/<stem>.png; 150 classes: index 0 ("other") becomes 255
          and the rest shift down by one (mmseg's reduce_zero_label, as DINOv2 evaluates).
  nyu     NYU Depth v2 as extracted for BTS/AdaBins: official_splits/{train,test}/<scene>/rgb_<id>.jpg
          with sync_depth_<id>.png (16-bit, millimetres); val reads the test split. root: the folder
          holding official_splits, or official_splits itself.
  plain   {train,val}/images/<stem>.{jpg,jpeg,png} with {train,val}/masks/<stem>.png (class-index PNG,
          255 = ignore; classes.txt at the root names them, else max index + 1) or
          {train,val}/depth/<stem>.png (16-bit, millimetres).

A wrong or partial folder raises DataError naming what is missing; a label that does not fit its
image (size, mode, dtype, class index) raises DataError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError

LAYOUTS = ("voc", "ade20k", "nyu", "plain")
IGNORE = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
VOC_CLASSES = 21
ADE_CLASSES = 150
MM = 0.001  # metres per unit of the 16-bit depth PNGs


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


@dataclass
class DenseSet:
    """Where the pairs of each split are and how their labels decode."""

    root: Path
    layout: str  # one of LAYOUTS
    kind: str  # seg | depth
    train: list[Pair]
    val: list[Pair]
    num_classes: int = 0  # seg: classes 0..num_classes-1 (255 = ignore); depth: 0
    classes: tuple[str, ...] = ()
    reduce_zero_label: bool = False  # ADE20K: 0 -> 255, k -> k - 1
    depth_scale: float = MM  # metres per PNG unit


# ------------------------------------------------------------------------------------------ layouts


def detect_layout(root: Path) -> str:
    """The layout whose marker folders `root` holds; DataError naming the markers when none does."""
    if (root / "JPEGImages").is_dir() or (root / "VOC2012").is_dir():
        return "voc"
    if (root / "images" / "training").is_dir() or (root / "ADEChallengeData2016").is_dir():
        return "ade20k"
    if (root / "official_splits").is_dir() or root.name == "official_splits":
        return "nyu"
    if (root / "train").is_dir() or (root / "val").is_dir():
        return "plain"
    raise DataError(
        f"{root}: not a dense dataset folder: expected VOC (JPEGImages/), ADE20K (images/training/), "
        f"NYU (official_splits/) or the plain layout (train/ and val/ with images/ and masks/ or depth/)"
    )


def open_dense(root: str | Path, kind: str, layout: str = "auto") -> DenseSet:
    """The pairs of `root` for labels of `kind` (seg | depth), in the given or detected layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: choose from auto, {', '.join(LAYOUTS)}")
    ds = {"voc": _voc, "ade20k": _ade20k, "nyu": _nyu, "plain": _plain}[layout](root, kind)
    if ds.kind != kind:
        raise DataError(
            f"{root}: the {layout} layout holds {ds.kind} labels, not {kind} "
            f"({'--task depth' if ds.kind == 'depth' else '--task seg or retrieval'} reads it)"
        )
    for split in ("train", "val"):
        if not getattr(ds, split):
            raise DataError(f"{root}: the {split} split of the {layout} layout is empty")
    return ds


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: missing ({what})")
    return path


def _pairs(candidates: list[tuple[Path, Path]], where: Path) -> list[Pair]:
    """(image, label) paths -> Pairs; DataError naming the first missing file and how many are missing."""
    missing = [str(path) for pair in candidates for path in pair if not path.is_file()]
    if missing:
        raise DataError(f"{where}: {len(missing)} listed file(s) missing, the first {missing[0]}")
    return [Pair(image, label) for image, label in candidates]


def _voc(root: Path, kind: str) -> DenseSet:
    for sub in ("VOC2012", "VOCdevkit/VOC2012"):
        if (root / sub / "JPEGImages").is_dir():
            root = root / sub
    jpeg = _need_dir(root / "JPEGImages", "VOC 2012's images")
    masks = _need_dir(root / "SegmentationClass", "VOC 2012's class masks")
    lists = _need_dir(root / "ImageSets" / "Segmentation", "VOC 2012's split lists")
    splits = {}
    for split in ("train", "val"):
        listing = lists / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"{listing}: missing split list (one image stem per line, as VOC ships it)")
        stems = [s.strip() for s in listing.read_text().split() if s.strip()]
        splits[split] = _pairs([(jpeg / f"{s}.jpg", masks / f"{s}.png") for s in stems], listing)
    return DenseSet(root, "voc", "seg", splits["train"], splits["val"], VOC_CLASSES)


def _ade20k(root: Path, kind: str) -> DenseSet:
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    splits = {}
    for split, name in (("train", "training"), ("val", "validation")):
        images = _need_dir(root / "images" / name, f"ADE20K's {split} images")
        labels = _need_dir(root / "annotations" / name, f"ADE20K's {split} annotations")
        stems = sorted(p.stem for p in images.glob("*.jpg"))
        splits[split] = _pairs([(images / f"{s}.jpg", labels / f"{s}.png") for s in stems], images)
    return DenseSet(
        root, "ade20k", "seg", splits["train"], splits["val"], ADE_CLASSES, reduce_zero_label=True
    )


def _nyu(root: Path, kind: str) -> DenseSet:
    if (root / "official_splits").is_dir():
        root = root / "official_splits"
    splits = {}
    for split, name in (("train", "train"), ("val", "test")):
        folder = _need_dir(root / name, f"NYU Depth v2's {name} split")
        rgbs = sorted(folder.rglob("rgb_*.jpg"))
        # rgb_<id>.jpg beside sync_depth_<id>.png in each scene folder
        pairs = [(p, p.with_name(f"sync_depth_{p.stem[len('rgb_') :]}.png")) for p in rgbs]
        splits[split] = _pairs(pairs, folder)
    return DenseSet(root, "nyu", "depth", splits["train"], splits["val"])


def _plain(root: Path, kind: str) -> DenseSet:
    found = {}
    for split in ("train", "val"):
        images = _need_dir(root / split / "images", f"the plain layout's {split} images")
        label_dirs = [d for d in ("masks", "depth") if (root / split / d).is_dir()]
        if not label_dirs:
            raise DataError(f"{root / split}: missing masks/ (class-index PNGs) or depth/ (16-bit PNGs)")
        labels = root / split / ("masks" if "masks" in label_dirs and kind == "seg" else label_dirs[-1])
        by_stem = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
        found[split] = (
            labels.name,
            _pairs([(by_stem[s], labels / f"{s}.png") for s in sorted(by_stem)], images),
        )
    (train_dir, train), (val_dir, val) = found["train"], found["val"]
    if train_dir != val_dir:
        raise DataError(
            f"{root}: train holds {train_dir}/ but val holds {val_dir}/; both need the same labels"
        )
    if train_dir == "depth":
        return DenseSet(root, "plain", "depth", train, val)
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = tuple(n.strip() for n in names_file.read_text().splitlines() if n.strip())
    else:  # the largest class index of any mask names the count
        top = 0
        for pair in train + val:
            index = np.asarray(_open(pair.label)).astype(np.int64)
            top = max(top, int(index[index != IGNORE].max(initial=0)))
        classes = tuple(str(i) for i in range(top + 1))
    return DenseSet(root, "plain", "seg", train, val, len(classes), classes)


# ------------------------------------------------------------------------------------------ decoders


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
    return img


def read_image(path: Path) -> torch.Tensor:
    """-> (3, H, W) uint8 RGB."""
    return torch.from_numpy(np.asarray(_open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _check_size(path: Path, img: Image.Image, hw: tuple[int, int], what: str) -> None:
    if (img.height, img.width) != tuple(hw):
        raise DataError(
            f"{path}: {what} is {img.width}x{img.height} but its image is {hw[1]}x{hw[0]}; "
            "labels must have their image's size"
        )


def read_mask(path: Path, hw: tuple[int, int], ds: DenseSet) -> torch.Tensor:
    """A class-index PNG (palette or greyscale; VOC's palette indices are the classes) -> (H, W) int64
    with 255 = ignore, checked against its image's size and the class count."""
    img = _open(path)
    _check_size(path, img, hw, "the mask")
    if img.mode not in ("P", "L"):
        raise DataError(
            f"{path}: a mask must be a class-index PNG (palette or 8-bit greyscale), got mode {img.mode}; "
            "a colour-coded mask must be converted to class indices first"
        )
    mask = torch.from_numpy(np.asarray(img).astype(np.int64))
    if ds.reduce_zero_label:
        mask = torch.where(mask == 0, IGNORE, mask - 1)
        mask[mask == IGNORE - 1] = IGNORE  # 255 - 1 from an ignore-marked pixel stays ignored
    bad = (mask != IGNORE) & (mask >= ds.num_classes)
    if bad.any():
        raise DataError(
            f"{path}: class index {int(mask[bad].max())} but the {ds.layout} set has {ds.num_classes} classes"
        )
    return mask


def read_depth(path: Path, hw: tuple[int, int], ds: DenseSet) -> torch.Tensor:
    """A 16-bit depth PNG -> (H, W) float32 metres (0 = no measurement), checked against its image."""
    img = _open(path)
    _check_size(path, img, hw, "the depth map")
    if not img.mode.startswith("I"):
        raise DataError(
            f"{path}: a depth map must be a 16-bit greyscale PNG (millimetres), got mode {img.mode} "
            f"({'8-bit' if img.mode in ('L', 'P', 'RGB', 'RGBA', 'LA') else 'not 16-bit'}); "
            "8-bit depth has lost its scale"
        )
    return torch.from_numpy(np.asarray(img).astype(np.float32)) * ds.depth_scale
