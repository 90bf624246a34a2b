"""The embedded demo photos: a real CC0 ImageNet-style tree, converted once and re-used from the cache."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline import convert as cv
from pipeline import demo
from pipeline.shards import verify_shard


def test_photos_are_a_small_imagenet_style_tree():
    files = sorted(demo.PHOTOS.rglob("*.jpg"))
    classes = {p.parent.name for p in files}
    assert 6 <= len(classes) and 30 <= len(files) <= 200
    assert sum(p.stat().st_size for p in files) < 5e6
    for split in ("train", "val"):
        assert sorted(p.name for p in (demo.PHOTOS / split).iterdir()) == sorted(classes)
    for p in files[::7]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and 150 <= min(im.size) <= 400
    assert (demo.PHOTOS / "README.txt").read_text().count("CC0") >= 3


def test_demo_shards_hold_every_photo_once(demo_shards: Path):
    meta = json.loads((demo_shards / "dataset.json").read_text())
    classes = sorted(p.name for p in (demo.PHOTOS / "train").iterdir())
    assert meta["classes"] == classes and not meta["skipped"]
    keys = {}
    for rec in meta["shards"]:
        for key, label in verify_shard(demo_shards / rec["name"], len(classes), rec["sha256"]):
            assert (rec["split"], key) not in keys
            keys[rec["split"], key] = label
    want = {
        (
            p.relative_to(demo.PHOTOS).parts[0],
            p.relative_to(demo.PHOTOS / p.parts[-3]).with_suffix("").as_posix(),
        ): classes.index(p.parent.name)
        for p in demo.PHOTOS.rglob("*.jpg")
    }
    assert keys == want
    for split in ("train", "val"):  # several shards per split, so rank sharding has work to split
        assert sum(r["split"] == split for r in meta["shards"]) >= 2


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    out = demo.ensure_demo_shards(tmp_path / "cache")
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert demo.ensure_demo_shards(tmp_path / "cache") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == first, "complete cache re-converted"

    victim = min(first)
    (out / victim).write_bytes(b"damaged")
    demo.ensure_demo_shards(tmp_path / "cache")
    cv.verify(out)
    assert (out / victim).stat().st_mtime_ns != first[victim]

    # changed photos (here: one photo fewer) invalidate the cache through the fingerprint
    photos = tmp_path / "photos"
    shutil.copytree(demo.PHOTOS, photos)
    next(iter(sorted(photos.rglob("*.jpg")))).unlink()
    monkeypatch.setattr(demo, "PHOTOS", photos)
    meta = json.loads((demo.ensure_demo_shards(tmp_path / "cache") / "dataset.json").read_text())
    assert meta["splits"]["train"]["count"] + meta["splits"]["val"]["count"] == len(
        list(photos.rglob("*.jpg"))
    )


def _build(cache: str) -> str:
    return str(demo.ensure_demo_shards(cache))


@pytest.mark.integration
def test_concurrent_ranks_share_one_conversion(tmp_path):
    """Every torchrun rank calls ensure_demo_shards on the same fresh cache at the same time."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        outs = pool.map(_build, [str(tmp_path / "cache")] * 3)
    assert len(set(outs)) == 1
    cv.verify(outs[0])
    assert not list(Path(outs[0]).glob("*.tmp"))


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EQRECON_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "demo-shards"
    monkeypatch.delenv("EQRECON_CACHE")
    assert demo.default_cache_dir().parts[-2:] == (".cache", "demo-shards")


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_shards_decode_with_dali_cpu(demo_shards: Path, split: str):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    meta = json.loads((demo_shards / "dataset.json").read_text())
    tars = [str(demo_shards / r["name"]) for r in meta["shards"] if r["split"] == split]
    n = meta["splits"][split]["count"]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[:-4] + ".idx" for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="skip",
            name="r",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    images, labels = p.run()
    assert sorted(int(bytes(labels.at(i))) for i in range(n)) == sorted(
        meta["classes"].index(q.parent.name) for q in (demo.PHOTOS / split).rglob("*.jpg")
    )
    assert all(images.at(i).shape[2] == 3 and min(images.at(i).shape[:2]) >= 150 for i in range(n))
