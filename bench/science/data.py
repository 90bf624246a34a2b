"""The science run's data: photos and Fashion-MNIST fetched from package registries, then crops and shards.

fetch: bench/science_data.sh into WORK/raw (needs Debian's and PyPI's registries), pruned to the
photos and Fashion-MNIST (~60 MB) so that it can be carried to a machine without network.
data: random crops of the photos, one class per source photo (train crops from 5/6 of the photos, val
crops from the other 1/6), and the Fashion-MNIST images, converted into shards (offline given raw/).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.science.sizes import Size

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[science {time.strftime('%H:%M:%S')}] {msg}", flush=True)


FMNIST_CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
# Where the photos are inside the fetched packages (opencv-doc's html/ holds diagrams and screenshots).
PHOTO_DIRS = ("skimage/data/", "usr/share/backgrounds/", "opencv-doc/examples/")
# Files in the packages that are masks, ground truths, synthetic patterns or text pages, not photos.
NOT_PHOTOS = (
    "mask",
    "/color.png",
    "gt.",
    "_result",
    "trimap",
    "chessboard",
    "phantom",
    "logo",
    "horse",
    "text",
    "page",
    "digits",
    "gradient",
    "ellipses",
    "shape_sample",
    "sudoku",
    "binary",
    "blox",
    "cards",
    "detect_blob",
)


def source_photos(raw: Path) -> list[Path]:
    """Every photo in the fetched packages: RGB or greyscale, short side >= 240 px, not a mask or chart."""
    found = []
    for path in sorted(raw.rglob("*")):
        name = path.as_posix().lower()
        if (
            path.suffix.lower() not in (".jpg", ".jpeg", ".png")
            or not any(d in name for d in PHOTO_DIRS)
            or any(s in name for s in NOT_PHOTOS)
        ):
            continue
        try:
            with Image.open(path) as im:
                if im.mode in ("RGB", "L") and min(im.size) >= 240:
                    found.append(path)
        except OSError:
            continue
    return found


def is_val_photo(path: Path) -> bool:
    """A fixed 1/6 of the photos, by a hash of the file name: their crops are never trained on."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 6 == 0


def _write_crops(task: tuple[Path, Path, int, int, int]) -> int:
    """Random crops (8-100 % of the area, aspect 3:4-4:3) of one photo, short side resized to px."""
    photo, out, n, px, seed = task
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with Image.open(photo) as im:
        im = im.convert("RGB")
    w, h = im.size
    for i in range(n):
        area, aspect = rng.uniform(0.08, 1.0) * w * h, rng.uniform(3 / 4, 4 / 3)
        cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = px / min(cw, ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        crop.save(out / f"{photo.stem}-{seed}-{i:05d}.jpg", quality=90)
    return n


def make_photo_crops(photos: list[Path], src: Path, total: int, px: int, workers: int) -> None:
    """src/train/<NNN-photo>/*.jpg: `total` crops spread evenly over the photos, one class per source
    photo, so that the probe can hold out whole photos (train.probe.source_groups)."""
    tasks = []
    for j, (i, photo) in enumerate(photos):
        n = total // len(photos) + (j < total % len(photos))
        seed = int(hashlib.sha256(photo.name.encode()).hexdigest()[:8], 16)
        tasks.append((photo, src / "train" / f"{i:03d}-{photo.stem}", n, px, seed))
    with multiprocessing.Pool(workers) as pool:
        done = sum(pool.imap_unordered(_write_crops, tasks))
    log(f"wrote {done} crops of {len(photos)} photos into {src}")


def _idx(path: Path) -> np.ndarray:
    """An idx (MNIST format) array from its .gz file."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_fmnist(folder: Path, src: Path, size: Size) -> None:
    """src/{train,val}/<class>/*.jpg from Fashion-MNIST's train and t10k sets (the first N of each)."""
    for split, prefix, n in (("train", "train", size.fmnist_train), ("val", "t10k", size.fmnist_val)):
        images, labels = (
            _idx(folder / f"{prefix}-images-idx3-ubyte.gz"),
            _idx(folder / f"{prefix}-labels-idx1-ubyte.gz"),
        )
        for c, name in enumerate(FMNIST_CLASSES):
            (src / split / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
        for i in range(min(n, len(images))):
            c = int(labels[i])
            Image.fromarray(images[i]).save(
                src / split / f"{c}-{FMNIST_CLASSES[c]}" / f"{i:05d}.jpg", quality=95
            )
    log(f"wrote Fashion-MNIST ({size.fmnist_train} train, {size.fmnist_val} val) into {src}")


def fetch(raw: Path) -> None:
    """bench/science_data.sh into raw/ (needs Debian's and PyPI's registries), then keep only the photos
    and Fashion-MNIST (~60 MB), small enough to carry to a GPU machine that has no network."""
    if (raw / ".pruned").is_file():
        return
    subprocess.run(["bash", str(ROOT / "bench" / "science_data.sh"), str(raw), sys.executable], check=True)
    keep = set(source_photos(raw)) | set(fmnist_dir(raw).glob("*.gz"))
    for path in sorted(raw.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and path not in keep and path.name != ".done":
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    (raw / ".pruned").touch()
    log(f"fetched {len(keep)} files into {raw}")


def fmnist_dir(raw: Path) -> Path:
    return raw / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"


def prepare_data(work: Path, size: Size, workers: int) -> dict:
    """Crops of the fetched photos and Fashion-MNIST, converted into shards (offline given raw/);
    -> data.json's content: shard folders, train crop count, the photos used."""
    from pipeline.convert import convert

    raw = work / "raw"
    if not (raw / ".done").is_file():
        raise SystemExit(
            f"science: {raw} has no fetched data; run `python -m bench.science --size ... --parts fetch` "
            f"on a machine that reaches Debian and PyPI, and bring {raw} along"
        )
    photos = source_photos(raw)
    # photos: training crops of 5/6 of the photos; probe: crops of the other 1/6, never trained on (each
    # its own dataset: the converter's val split may only hold classes that train has).
    numbered = list(enumerate(photos))
    train_photos = [(i, p) for i, p in numbered if not is_val_photo(p)]
    probe_photos = [(i, p) for i, p in numbered if is_val_photo(p)]
    for name, make in (
        ("photos", lambda src: make_photo_crops(train_photos, src, size.crops_train, size.crop_px, workers)),
        ("probe", lambda src: make_photo_crops(probe_photos, src, size.crops_val, size.crop_px, workers)),
        ("fmnist", lambda src: make_fmnist(fmnist_dir(raw), src, size)),
    ):
        out = work / name
        if (out / "dataset.json").is_file():
            continue
        src = work / f"{name}-src"
        shutil.rmtree(src, ignore_errors=True)
        make(src)
        convert(src, out, split="all", shard_size=1000, workers=workers, seed=0, quiet=True)
        shutil.rmtree(src)
    count = lambda name: json.loads((work / name / "dataset.json").read_text())["splits"]["train"]["count"]
    info = {
        "photos": str(work / "photos"),
        "probe": str(work / "probe"),
        "fmnist": str(work / "fmnist"),
        "n_train_crops": count("photos"),
        "n_probe_crops": count("probe"),
        "sources": [p.relative_to(raw).as_posix() for p in photos],
        "val_sources": [p.relative_to(raw).as_posix() for _, p in probe_photos],
    }
    (work / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
