"""The PyTorch reference loader over the demo shards: Batch contract, determinism, sharding, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as F

from pipeline import build_loader
from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError, DataError, ShardError
from pipeline.oracle import crop_resize, decode, make_views, sample_theta_for
from pipeline.path import CROP2, THETA_DIM, PathConfig, crop_box_pixels
from pipeline.reference import ReferenceLoader, build_reference_loader, interleave
from pipeline.shards import read_shard

SIZE = 32  # tiny views keep a whole demo epoch (64 photos) around a second


def _cfg(data_dir: Path, **kw) -> DataConfig:
    base = {"dir": str(data_dir), "loader": "reference", "img_size": SIZE, "batch_size": 4, "workers": 2}
    return DataConfig(**{**base, **kw})


def _samples(data_dir: Path, split: str = "train") -> list[dict]:
    meta = json.loads((data_dir / "dataset.json").read_text())
    return [
        s for r in meta["shards"] if r["split"] == split for s in read_shard(data_dir / r["name"], r["count"])
    ]


# Render in-process (workers=0) on one thread, as DataLoader workers do: tiny images gain nothing
# from intra-op threads, and on a loaded 2-core machine they made an epoch 15x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def catalogue(demo_shards) -> dict[str, tuple[int, tuple[int, int]]]:
    """key -> (label, source (H, W)) of every demo train photo."""
    return {s["__key__"]: (int(s["cls"]), tuple(decode(s["jpg"]).shape[-2:])) for s in _samples(demo_shards)}


def _key_finder(catalogue, cfg: DataConfig, epoch: int):
    """θ row -> sample key: θ is a function of (seed, epoch, key), so it identifies the sample."""
    table = {tuple(sample_theta_for(k, hw, cfg, epoch).tolist()): k for k, (_, hw) in catalogue.items()}
    return lambda theta: [table[tuple(row.tolist())] for row in theta]


def _epoch(loader) -> list[Batch]:
    return list(loader)


def _same(a: list[Batch], b: list[Batch]) -> bool:
    fields = ("view1", "view2", "targets", "theta", "label")
    return len(a) == len(b) and all(
        torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields
    )


# --- one sample ----------------------------------------------------------------------------------------


def test_decode_gives_rgb_uint8_and_names_bad_samples(demo_shards):
    by_key = {s["__key__"]: s for s in _samples(demo_shards)}
    img = decode(by_key[next(k for k in by_key if k.startswith("cat/"))]["jpg"])
    assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
    grey = decode(by_key[next(k for k in by_key if k.startswith("camera/"))]["jpg"])  # greyscale JPEG
    assert grey.shape[0] == 3 and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    with pytest.raises(DataError, match="sample 'x/broken': undecodable"):
        decode(b"\xff\xd8 not really a jpeg", "x/broken")
    with pytest.raises(DataError, match="sample 'x/empty': empty"):
        decode(b"", "x/empty")


def test_crop_resize_crops_the_fractional_box_then_flips():
    img = torch.randint(0, 256, (3, 300, 250), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = crop_resize(img, (0.1, 0.2, 0.5, 0.6), True, 64)  # rows 30..180, columns 50..200
    want = F.resize(img[:, 30:180, 50:200].float() / 255, [64, 64], antialias=True).flip(-1)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out, want, atol=1e-6)
    # sampled boxes are whole pixels of the source, recovered exactly from the float32 fractions
    theta = sample_theta_for("any", (300, 250), DataConfig(), 0)
    top, left, h, w = crop_box_pixels(theta[CROP2], (300, 250))
    assert torch.allclose(
        theta[CROP2].double(),
        torch.tensor([top / 300, left / 250, h / 300, w / 250], dtype=torch.float64),
        atol=1e-6,
    )


def test_make_views_shapes_ranges_and_target_size(demo_shards):
    cfg = DataConfig(img_size=40, target_size=24, aug=PathConfig(k=3))
    img = decode(_samples(demo_shards)[0]["jpg"])
    theta = sample_theta_for("k", tuple(img.shape[-2:]), cfg, 0)
    view1, view2, targets = make_views(img, theta, cfg)
    assert view1.shape == view2.shape == (3, 40, 40) and targets.shape == (3, 3, 24, 24)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for x in (view1, view2, targets):
        pixels = x * std + mean
        assert x.dtype == torch.float32 and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    _, _, none = make_views(img, theta, DataConfig(img_size=40, aug=PathConfig(k=0)))
    assert none.shape == (0, 3, 40, 40)


# --- the loader ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_loader_yields_the_documented_batch_with_right_labels(demo_shards, catalogue):
    cfg = _cfg(demo_shards, target_size=16, aug=PathConfig(k=2))
    loader = build_loader(cfg)  # the public entry, dispatching to the reference backend
    assert isinstance(loader, ReferenceLoader)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 64 // 4  # 8 shards of 8 in 2 streams of 32: nothing dropped
    find = _key_finder(catalogue, cfg, epoch=0)
    seen = []
    for b in batches:
        assert b.view1.shape == b.view2.shape == (4, 3, SIZE, SIZE)
        assert b.targets.shape == (4, 2, 3, 16, 16) and b.theta.shape == (4, THETA_DIM)
        assert b.label.shape == (4,) and b.label.dtype == torch.int64
        assert all(
            t.dtype == torch.float32 and t.device.type == "cpu"
            for t in (b.view1, b.view2, b.targets, b.theta)
        )
        assert b.view1.min() >= -2.2 and b.view1.max() <= 2.7  # ImageNet-normalised [0, 1] pixels
        keys = find(b.theta)
        assert b.label.tolist() == [catalogue[k][0] for k in keys]
        seen += keys
    assert sorted(seen) == sorted(catalogue)  # every photo exactly once


@pytest.mark.integration
def test_same_seed_same_batches_other_seed_or_epoch_differs(demo_shards):
    cfg = _cfg(demo_shards)
    first = _epoch(build_reference_loader(cfg, demo_shards))
    assert _same(first, _epoch(build_reference_loader(cfg, demo_shards)))
    assert not _same(first, _epoch(build_reference_loader(_cfg(demo_shards, seed=1), demo_shards)))
    loader = build_reference_loader(cfg, demo_shards)
    loader.set_epoch(1)
    second = _epoch(loader)
    assert len(second) == len(first) and not _same(first, second)


@pytest.mark.integration
def test_a_sample_is_augmented_the_same_whatever_the_worker_count(demo_shards, catalogue):
    views = []
    for workers in (0, 2):
        cfg = _cfg(demo_shards, workers=workers)
        find = _key_finder(catalogue, cfg, epoch=0)
        views.append(
            {
                k: v
                for b in _epoch(build_reference_loader(cfg, demo_shards))
                for k, v in zip(find(b.theta), b.view2)
            }
        )
    assert views[0].keys() == views[1].keys() == catalogue.keys()
    assert all(torch.equal(views[0][k], views[1][k]) for k in views[0])


@pytest.mark.integration
def test_ranks_get_disjoint_samples_and_the_same_number_of_batches(demo_shards, catalogue):
    # 64 samples over 3 ranks × 2 workers: contiguous ranges of 21/21/22 samples (pipeline.shards), each
    # cut into 64 // 3 // 2 = 10 batches of 2, so the longer range drops its extra samples
    cfg = _cfg(demo_shards, batch_size=6)
    find = _key_finder(catalogue, cfg, epoch=0)
    loaders = [build_reference_loader(cfg, demo_shards, rank=r, world_size=3) for r in range(3)]
    lengths = [len(ld) for ld in loaders]
    assert lengths == [10, 10, 10]
    keys = []
    for ld in loaders:
        batches = _epoch(ld)
        assert len(batches) == len(ld) and all(len(b) == 2 for b in batches)
        keys.append({k for b in batches for k in find(b.theta)})
    assert all(len(k) == 20 for k in keys)
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


@pytest.fixture
def three_shards(demo_shards, tmp_path) -> Path:
    """The first three demo train shards (24 samples): two workers read 12 each, across a tar boundary."""
    meta = json.loads((demo_shards / "dataset.json").read_text())
    meta["shards"] = [r for r in meta["shards"] if r["split"] == "train"][:3]
    for r in meta["shards"]:
        shutil.copy(demo_shards / r["name"], tmp_path / r["name"])
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


def test_interleave_is_round_robin_over_streams_with_batches_left():
    assert interleave([4, 2]) == [0, 1, 0, 1, 0, 0]
    assert interleave([1, 3, 2]) == [0, 1, 2, 1, 2, 1]


@pytest.mark.integration
def test_resume_continues_exactly_where_the_run_stopped(three_shards):
    cfg = _cfg(three_shards)
    full = _epoch(build_reference_loader(cfg, three_shards))
    assert len(full) == 6  # two streams of 3 batches
    # stop after 3 batches, then resume in a fresh loader from the saved state
    loader = build_reference_loader(cfg, three_shards)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    for position in (3, 4, 5):
        resumed = build_reference_loader(cfg, three_shards)
        resumed.load_state_dict({**state, "batch": position})
        resumed.set_epoch(0)  # what a trainer calls at the top of the epoch: keeps the position
        assert _same(_epoch(resumed), full[position:]), position
        assert (resumed.state_dict()["epoch"], resumed.state_dict()["batch"]) == (
            0,
            6,
        )  # finished, not rolled on
    with pytest.raises(ConfigError, match="workers"):
        build_reference_loader(_cfg(three_shards, workers=1), three_shards).load_state_dict(state)
    # a state without the loader's name (as written before 0.1.0's checkpoint format) is refused
    unnamed = {k: v for k, v in state.items() if k != "loader"}
    with pytest.raises(ConfigError, match="saved loader=None, now 'reference'"):
        build_reference_loader(cfg, three_shards).load_state_dict(unnamed)
    # a DALI loader's state: its batch count is kept (the epoch ends on time), the order is ours
    foreign = {k: v for k, v in state.items() if k != "workers"} | {"loader": "dali"}
    resumed = build_reference_loader(_cfg(three_shards, workers=1), three_shards)
    with pytest.warns(UserWarning, match="from a dali loader state"):
        resumed.load_state_dict(foreign)
    assert len(_epoch(resumed)) == 6 - 3


# --- errors --------------------------------------------------------------------------------------------


@pytest.fixture
def copied(demo_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out


def test_missing_shard_is_named_at_build(copied):
    (copied / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match="train-000003.tar"):
        build_reference_loader(_cfg(copied), copied)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_named_in_one_line(copied, workers):
    tar = copied / "train-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar") as err:
        _epoch(build_reference_loader(_cfg(copied, workers=workers), copied))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_shard_count_disagreeing_with_dataset_json_is_an_error(copied):
    meta = json.loads((copied / "dataset.json").read_text())
    meta["shards"][0]["count"] += 1
    (copied / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train-000000\.tar holds 8 samples but dataset.json says 9"):
        _epoch(build_reference_loader(_cfg(copied, workers=0), copied))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"batch_size": 80, "workers": 1}, ConfigError, "cannot fill one batch of 40"),
        (
            {"aug": PathConfig(transforms=("rotation", "shear"))},
            ConfigError,
            "unknown transformation 'shear'",
        ),
        ({"split": "test"}, DataError, "no 'test' shards"),
    ],
)
def test_bad_settings_are_clear_errors(demo_shards, change, error, match):
    with pytest.raises(error, match=match):
        build_reference_loader(_cfg(demo_shards, **change), demo_shards, rank=0, world_size=2)
