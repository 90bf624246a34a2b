"""Tiny dense-set fixtures laid out as VOC 2012, ADE20K and NYU Depth v2 (BTS) name their files: a few
random images with masks or 16-bit depth PNGs, for the reader and the dense-probe tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255


def write_jpg(path: Path, hw=(20, 30), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # VOC's masks: palette PNGs whose indices are the classes (colours unrelated to them)
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        img = Image.fromarray(array)
    img.save(path)


def mask_array(hw=(20, 30), top=20) -> np.ndarray:
    m = (np.arange(hw[0] * hw[1]).reshape(hw) % (top + 1)).astype(np.uint8)
    m[0, :] = IGNORE
    return m


def make_voc(root: Path, val_list: bool = True) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    stems = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for i, stem in enumerate(stems["train"] + stems["val"]):
        write_jpg(voc / "JPEGImages" / f"{stem}.jpg", seed=i)
        write_png(voc / "SegmentationClass" / f"{stem}.png", mask_array(), palette=True)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, names in stems.items():
        if split == "train" or val_list:
            (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root / "VOCdevkit"


def make_ade(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        write_jpg(ade / "images" / split / f"{stem}.jpg")
        m = np.zeros((20, 30), np.uint8)
        m[:, 10:] = 1
        m[:, 20:] = 150
        write_png(ade / "annotations" / split / f"{stem}.png", m)
    return ade


def make_nyu(root: Path) -> Path:
    for split, scene in (("train", "bedroom_0001"), ("test", "kitchen_0002")):
        folder = root / "official_splits" / split / scene
        write_jpg(folder / "rgb_00045.jpg")
        write_png(folder / "sync_depth_00045.png", np.full((20, 30), 2500, np.uint16))
    return root
