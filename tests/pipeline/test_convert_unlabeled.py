"""pipeline.convert on folders with no class structure (--labels auto|folders|none): every image is
accounted for, the shards hold `.jpg` alone, dataset.json says "labeled": false, both loaders give
label -1, and a demo training runs on them (integration)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from photo_oddities import make_oddities

from pipeline import convert as cv
from pipeline import dali_available
from pipeline.batch import DataConfig
from pipeline.demo import PHOTOS
from pipeline.errors import ConvertError, ShardError
from pipeline.path import PathConfig
from pipeline.reference import build_reference_loader
from pipeline.shards import dataset_is_labeled, load_meta, verify_shard

REPO = Path(__file__).resolve().parents[2]
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def photos(n: int, start: int = 0) -> list[Path]:
    """n of the embedded real photos (all classes mixed, as a camera roll would be)."""
    chosen = sorted(PHOTOS.glob("train/*/*.jpg"))[start : start + n]
    assert len(chosen) == n, f"the demo has no {n} photos from {start}"
    return chosen


def flat_folder(root: Path, n: int = 12) -> dict:
    """root/*.jpg (n real photos) plus a hidden file, a text file and a corrupt image ->
    {"images": {rel: key}, "skipped": {rel: reason prefix}, "ignored": [rel]}."""
    root.mkdir(parents=True)
    images = {}
    for photo in photos(n):
        shutil.copy(photo, root / photo.name)
        images[photo.name] = photo.stem
    (root / "broken.jpg").write_bytes(photos(1)[0].read_bytes()[:700])  # cut inside the scan data
    shutil.copy(photos(1)[0], root / ".hidden.jpg")
    (root / "notes.txt").write_text("not an image")
    return {"images": images, "skipped": {"broken.jpg": "truncated"}, "ignored": [".hidden.jpg", "notes.txt"]}


def nested_folder(root: Path) -> dict:
    """Photos at several depths (loose, one and two folders down), ImageNet's oddities two folders
    down, hidden files and a hidden folder -> the same description as flat_folder."""
    images, skipped = {}, {}
    layout = {"": photos(3), "2023/": photos(4, 20), "2023/summer/": photos(3, 40), "misc/": photos(2, 60)}
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for photo in files:
            shutil.copy(photo, root / folder / photo.name)
            images[folder + photo.name] = folder + photo.stem
    for name, expected in make_oddities(root / "2024" / "odd").items():
        rel = f"2024/odd/{name}"
        if expected.startswith("skip:"):
            skipped[rel] = expected[5:]
        else:
            images[rel] = rel.rsplit(".", 1)[0]
    shutil.copy(photos(1)[0], root / "2023" / "._resource_fork.jpg")  # macOS: hidden, listed, not read
    (root / ".thumbnails").mkdir()
    shutil.copy(photos(1)[0], root / ".thumbnails" / "x.jpg")
    return {"images": images, "skipped": skipped, "ignored": [".thumbnails/", "2023/._resource_fork.jpg"]}


def samples(out: Path) -> dict[str, list[str]]:
    """{key: its members' extensions} over every shard of out."""
    found: dict[str, list[str]] = {}
    for rec in load_meta(out)["shards"]:
        with tarfile.open(out / rec["name"]) as tar:
            for name in tar.getnames():
                key, ext = name.rsplit(".", 1)
                found.setdefault(key, []).append(ext)
    return found


def check_accounted(src_files: dict, out: Path, meta: dict) -> None:
    """Every image is a sample (its key) or skipped with its reason; nothing else is in the shards."""
    assert meta["labeled"] is False and meta["classes"] == [] and not dataset_is_labeled(meta)
    got = samples(out)
    assert got == {key: ["jpg"] for key in src_files["images"].values()}  # .jpg alone, no .cls
    reasons = {x["path"]: x["reason"] for x in meta["skipped"]}
    assert set(reasons) == set(src_files["skipped"])
    for rel, prefix in src_files["skipped"].items():
        assert reasons[rel].startswith(prefix), (rel, reasons[rel])
    assert meta["ignored"] == src_files["ignored"]
    assert meta["splits"] == {
        "train": {
            "count": len(src_files["images"]),
            "shards": len(meta["shards"]),
            "skipped": len(src_files["skipped"]),
        }
    }
    cv.verify(out)
    for rec in meta["shards"]:  # the shard's own check: -1 for every sample
        labels = {c for _, c in verify_shard(out / rec["name"], 0, rec["sha256"], labeled=False)}
        assert labels == {-1}


def test_flat_folder_every_image_accounted_for(tmp_path, capsys):
    want = flat_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    assert (
        cv.main(["--src", str(tmp_path / "photos"), "--out", str(out), "--shard-size", "5", "--workers", "1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "labels: none (auto: not a tree of class folders: 13 image(s) lie directly in the folder" in printed
    )
    assert "train: 12 unlabeled samples in 3 shards, 1 skipped" in printed
    check_accounted(want, out, json.loads((out / "dataset.json").read_text()))
    assert cv.main(["--verify", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: ok, 3 shards, train 12 samples, unlabeled"


def test_nested_folder_every_image_accounted_for(tmp_path):
    want = nested_folder(tmp_path / "photos")
    out = tmp_path / "photos" / "shards"  # inside --src: never read as source
    meta = cv.convert(tmp_path / "photos", out, shard_size=4, workers=1, quiet=True)
    check_accounted(want, out, meta)
    again = cv.convert(tmp_path / "photos", out, shard_size=4, workers=1, quiet=True)  # resumes: all kept
    assert again == meta


def class_tree(root: Path, classes=("cat", "coffee")) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for photo in sorted((PHOTOS / "train" / c).glob("*.jpg"))[:2]:
            shutil.copy(photo, root / c / photo.name)
    return root


def test_auto_labels_only_an_imagenet_style_tree(tmp_path, capsys):
    tree = class_tree(tmp_path / "tree")
    cv.main(["--src", str(tree), "--out", str(tmp_path / "a"), "--workers", "1"])
    assert "labels: class folders (auto: an ImageNet-style tree; --labels none" in capsys.readouterr().out
    labeled = load_meta(tmp_path / "a")
    assert labeled["labeled"] is True and labeled["classes"] == ["cat", "coffee"]
    assert all(exts == ["jpg", "cls"] for exts in samples(tmp_path / "a").values())

    none = cv.convert(tree, tmp_path / "b", workers=1, quiet=True, labels="none")  # folders ignored
    assert none["labeled"] is False and none["classes"] == []
    assert set(samples(tmp_path / "b")) == {
        f"{c}/{p.stem}" for c in ("cat", "coffee") for p in (tree / c).iterdir()
    }

    one = class_tree(tmp_path / "one", classes=("cat",))  # one folder: not a class structure
    assert cv.convert(one, tmp_path / "c", workers=1, quiet=True)["labeled"] is False
    assert cv.convert(one, tmp_path / "d", workers=1, quiet=True, labels="folders")["classes"] == ["cat"]

    deep = class_tree(tmp_path / "deep")
    shutil.copy(PHOTOS / "train/cat/cat_train_05.jpg", tmp_path / "deep/cat/x.jpg")
    (tmp_path / "deep/cat/sub").mkdir()
    shutil.copy(PHOTOS / "train/cat/cat_train_06.jpg", tmp_path / "deep/cat/sub/y.jpg")
    capsys.readouterr()
    cv.main(["--src", str(deep), "--out", str(tmp_path / "e"), "--workers", "1"])
    assert "1 image(s) lie more than one folder deep (cat/sub/y.jpg)" in capsys.readouterr().out


def test_labels_folders_on_a_flat_folder_is_one_line_naming_labels_none(tmp_path, capsys):
    flat_folder(tmp_path / "photos")
    assert (
        cv.main(["--src", str(tmp_path / "photos"), "--out", str(tmp_path / "o"), "--labels", "folders"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "no class folders" in err and "--labels none" in err


def test_labels_none_keeps_train_and_val_as_splits(tmp_path, capsys):
    src = tmp_path / "src"
    class_tree(src / "train")
    (src / "val").mkdir()
    for photo in photos(3, 56):  # loose val images and no LOC_val_solution.csv
        shutil.copy(photo, src / "val" / photo.name)
    assert cv.main(["--src", str(src), "--out", str(tmp_path / "a"), "--workers", "1"]) == 1
    err = capsys.readouterr().err  # auto: a train/val layout is labelled, and this one lacks its CSV
    assert (
        err.startswith("error: ")
        and "LOC_val_solution.csv is missing; to convert it without labels, pass --labels none" in err
    )
    meta = cv.convert(src, tmp_path / "b", workers=1, quiet=True, labels="none")
    assert meta["labeled"] is False and {s: v["count"] for s, v in meta["splits"].items()} == {
        "train": 4,
        "val": 3,
    }
    assert set(samples(tmp_path / "b")) == {
        *(f"{c}/{p.stem}" for c in ("cat", "coffee") for p in (src / "train" / c).iterdir()),
        *(p.stem for p in photos(3, 56)),
    }


def test_relabelling_into_the_same_out_is_refused(tmp_path):
    tree = class_tree(tmp_path / "tree")
    cv.convert(tree, tmp_path / "o", workers=1, quiet=True)
    with pytest.raises(ConvertError, match="already holds labeled shards .*the same --labels"):
        cv.convert(tree, tmp_path / "o", workers=1, quiet=True, labels="none")


def test_verify_shard_tells_the_layouts_apart(tmp_path):
    tree = class_tree(tmp_path / "tree")
    cv.convert(tree, tmp_path / "lab", workers=1, quiet=True)
    cv.convert(tree, tmp_path / "unl", workers=1, quiet=True, labels="none")
    with pytest.raises(ShardError, match=r"unexpected member .*\.cls' \(want <key>\.jpg alone"):
        verify_shard(tmp_path / "lab" / "train-000000.tar", labeled=False)
    with pytest.raises(ShardError, match="has no .cls"):
        verify_shard(tmp_path / "unl" / "train-000000.tar", labeled=True)
    (tmp_path / "unl" / "dataset.json").write_text(
        (tmp_path / "unl" / "dataset.json").read_text().replace('"labeled": false', '"labeled": true')
    )
    with pytest.raises(ShardError, match="has no .cls"):  # --verify follows dataset.json
        cv.verify(tmp_path / "unl")


def loader_cfg(data_dir: Path, loader: str) -> DataConfig:
    return DataConfig(
        dir=str(data_dir),
        loader=loader,
        img_size=16,
        batch_size=4,
        workers=int(loader == "dali"),  # the reference in this process; DALI needs a thread
        shuffle_buffer=4,
        aug=PathConfig(transforms=("rotation",), k=1),
    )


@pytest.fixture(scope="module")
def unlabeled_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlabeled")
    flat_folder(root / "photos")
    cv.convert(root / "photos", root / "shards", shard_size=5, workers=1, quiet=True)
    return root / "shards"


def test_reference_loader_gives_label_minus_one(unlabeled_shards):
    batches = list(build_reference_loader(loader_cfg(unlabeled_shards, "reference"), unlabeled_shards))
    assert len(batches) == 3  # 12 samples, batch 4
    for b in batches:
        assert b.view1.shape == (4, 3, 16, 16) and b.targets.shape == (4, 1, 3, 16, 16)
        assert b.label.dtype == torch.int64 and b.label.tolist() == [-1] * 4


@NEEDS_DALI
def test_dali_loader_reads_jpg_alone_and_gives_label_minus_one(unlabeled_shards):
    from pipeline.dali import build_dali_loader

    batches = list(build_dali_loader(loader_cfg(unlabeled_shards, "dali"), unlabeled_shards))
    assert len(batches) == 3  # all 12 samples read: none dropped for a missing .cls
    for b in batches:
        assert b.view1.shape == (4, 3, 16, 16) and b.label.tolist() == [-1] * 4


@pytest.mark.integration
def test_demo_training_and_export_on_an_unlabeled_folder(tmp_path):
    """The issue's "done when": convert a flat folder on the command line, train the demo preset on it
    (its own batch of 16) for 2 steps, export the backbone."""
    flat_folder(tmp_path / "photos", n=20)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, *argv],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    shards, runs = tmp_path / "shards", tmp_path / "run"
    converted = run("-m", "pipeline.convert", "--src", str(tmp_path / "photos"), "--out", str(shards))
    assert "labels: none (auto: not a tree of class folders" in converted.stdout
    assert "train: 20 unlabeled samples in 1 shards, 1 skipped" in converted.stdout
    run(
        "train/main.py",
        *("--preset", "demo", "--device", "cpu", "--data.img_size=32"),
        *("--data", str(shards), "--out", str(runs), "--steps", "2"),
    )
    logged = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps][-1] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    run("train/export.py", "--ckpt", str(runs / "ckpt" / "last.pt"), "--out", str(tmp_path / "backbone"))
    assert (tmp_path / "backbone" / "model.safetensors").is_file()
