"""pipeline.shards: the shard format (listing, reading, verifying, labels) and the one sharding rule both
loaders follow (same epoch length, same sample ranges, a checkpoint that resumes across loaders)."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import dali_available
from pipeline.batch import DataConfig
from pipeline.dali import build_dali_loader
from pipeline.errors import DataError, ShardError
from pipeline.path import PathConfig
from pipeline.reference import build_reference_loader, plan_streams
from pipeline.shards import (
    Shard,
    dataset_is_labeled,
    epoch_length,
    load_meta,
    parse_label,
    pieces,
    rank_range,
    read_shard,
    split_shards,
    verify_shard,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _cfg(data_dir, loader: str, **kw) -> DataConfig:
    base = {
        "dir": str(data_dir),
        "loader": loader,
        "img_size": 16,
        "batch_size": 16,
        "workers": int(loader == "dali"),  # the reference in this process (no worker); DALI needs a thread
        "shuffle_buffer": 16,
        "aug": PathConfig(transforms=("rotation",), k=0),
    }
    return DataConfig(**{**base, **kw})


@pytest.fixture
def copied(demo_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out


# --- the rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total, world", [(64, 1), (64, 3), (1000, 8), (7, 7), (13, 5)])
def test_rank_ranges_partition_the_samples_every_epoch(total, world):
    for epoch in range(3):
        ranges = sorted(rank_range(total, r, world, epoch) for r in range(world))
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, disjoint, complete
        assert {hi - lo for lo, hi in ranges} <= {total // world, -(-total // world)}
    if world > 1:  # ranks move over the data between epochs
        assert rank_range(total, 0, world, 0) != rank_range(total, 0, world, 1)


def test_pieces_cut_a_range_at_tar_boundaries():
    shards = [Shard(Path(f"s{i}.tar"), n, None) for i, n in enumerate((8, 8, 5))]
    assert [(s.path.name, a, z) for s, a, z in pieces(shards, 6, 18)] == [
        ("s0.tar", 6, 8),
        ("s1.tar", 0, 8),
        ("s2.tar", 0, 2),
    ]
    assert pieces(shards, 8, 8) == []


@NEEDS_DALI
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("batch, workers", [(8, 0), (14, 1), (20, 3)])
def test_dali_and_reference_have_the_same_epoch_length(demo_shards, world, batch, workers):
    batch = batch // world * world or world
    cfg = _cfg(demo_shards, "reference", batch_size=batch, workers=workers)
    want = epoch_length(64, world, batch // world)
    if want == 0:
        pytest.skip("no full batch")
    for rank in range(world):
        ref = build_reference_loader(cfg, demo_shards, rank, world)
        dali = build_dali_loader(_cfg(demo_shards, "dali", batch_size=batch), demo_shards, rank, world)
        assert len(ref) == len(dali) == want, (rank, world, batch)
        # the reference streams hold exactly the epoch's batches, whatever the worker count
        for epoch in (0, 1):
            parts, quota = plan_streams(ref.shards, rank, world, epoch, batch // world, max(1, workers))
            assert sum(quota) == want
            lo, hi = rank_range(64, rank, world, epoch)
            assert sum(z - a for p in parts for _, a, z in p) == hi - lo  # the whole range, nothing twice


@NEEDS_DALI
def test_both_loaders_read_the_same_samples_per_rank_and_epoch(demo_shards):
    # 2 ranks, batch 8 each: a rank's range (32 samples) is exactly its 4 batches, so the labels agree
    for epoch in (0, 1):
        for rank in (0, 1):
            labels = []
            for loader in ("reference", "dali"):
                build = build_dali_loader if loader == "dali" else build_reference_loader
                ld = build(_cfg(demo_shards, loader), demo_shards, rank, 2)
                ld.set_epoch(epoch)
                labels.append(Counter(label for b in ld for label in b.label.tolist()))
            assert labels[0] == labels[1] and sum(labels[0].values()) == 32, (epoch, rank)


@NEEDS_DALI
def test_a_dali_state_resumes_into_the_reference_loader(demo_shards):
    cfg = _cfg(demo_shards, "reference")
    straight = [b.theta for b in build_reference_loader(cfg, demo_shards, 1, 2)]
    for done in (1, 3, 4):
        dali = build_dali_loader(_cfg(demo_shards, "dali"), demo_shards, 1, 2)
        it = iter(dali)
        for _ in range(done):
            next(it)
        state = json.loads(json.dumps(dali.state_dict()))
        del it
        ref = build_reference_loader(cfg, demo_shards, 1, 2)
        with pytest.warns(UserWarning, match="from a dali loader state"):
            ref.load_state_dict(state)
        rest = [b.theta for b in ref]
        assert len(rest) == len(straight) - done  # the epoch ends at the same step
        assert all(torch.equal(a, b) for a, b in zip(rest, straight[done:]))  # the batches that follow
        ref.set_epoch(1)
        assert len(list(ref)) == len(straight)


# --- the format ----------------------------------------------------------------------------------------


def test_split_shards_lists_dataset_json_and_skips_empty_shards(copied):
    meta = json.loads((copied / "dataset.json").read_text())
    meta["shards"].append({"name": "train-000099.tar", "split": "train", "count": 0, "sha256": None})
    (copied / "dataset.json").write_text(json.dumps(meta))
    shards = split_shards(copied, "train", indexed=True)  # the empty shard has no tar: not listed
    assert [s.path.name for s in shards] == [f"train-{i:06d}.tar" for i in range(8)]
    assert all(s.count == 8 and s.sha256 for s in shards)
    with pytest.raises(DataError, match="no 'test' shards"):
        split_shards(copied, "test")


@pytest.mark.parametrize(
    "text, match", [("{", "dataset.json is missing or unreadable"), ('{"classes": []}', "lists no shards")]
)
def test_bad_dataset_json_is_named(copied, text, match):
    (copied / "dataset.json").write_text(text)
    with pytest.raises(DataError, match=match):
        load_meta(copied)


def test_dataset_is_labeled_reads_the_key_and_falls_back_to_the_class_list(demo_shards):
    assert dataset_is_labeled(load_meta(demo_shards)) is True
    assert dataset_is_labeled({"labeled": False, "classes": [], "shards": []}) is False
    assert dataset_is_labeled({"labeled": True, "classes": ["a"], "shards": []}) is True
    assert dataset_is_labeled({"classes": ["a", "b"], "shards": []}) is True  # before the key existed
    assert dataset_is_labeled({"classes": [], "shards": []}) is False
    with pytest.raises(DataError, match="\"labeled\" is 'no', not true or false"):
        dataset_is_labeled({"labeled": "no", "classes": ["a"], "shards": []})


def test_read_shard_reads_a_slice_and_checks_the_count(demo_shards):
    tar = demo_shards / "train-000000.tar"
    keys = [s["__key__"] for s in read_shard(tar, 8)]
    assert len(keys) == 8
    assert [s["__key__"] for s in read_shard(tar, 8, 2, 5)] == keys[2:5]
    with pytest.raises(ShardError, match="holds 8 samples but dataset.json says 9"):
        list(read_shard(tar, 9))


def test_verify_shard_returns_labels_and_names_damage(copied):
    tar = copied / "train-000001.tar"
    record = next(r for r in load_meta(copied)["shards"] if r["name"] == tar.name)
    samples = verify_shard(tar, n_classes=8, sha256=record["sha256"])
    assert [k for k, _ in samples] == [s["__key__"] for s in read_shard(tar)]
    assert all(0 <= c < 8 for _, c in samples)
    with pytest.raises(ShardError, match="not a class index < 2"):
        verify_shard(tar, n_classes=2)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="sha256 mismatch"):
        verify_shard(tar, sha256=record["sha256"])
    with pytest.raises(ShardError, match=r"train-000001\.tar: .*(truncated|end of)"):
        verify_shard(tar)


@pytest.mark.parametrize("raw", [b"", b"7a", b"-1", b" 3", "٣".encode()])
def test_parse_label_accepts_ascii_digits_only(raw):
    assert parse_label(b"0042", "x") == 42
    with pytest.raises(ShardError, match="shard-x: cls .* is not an ASCII class index"):
        parse_label(raw, "shard-x")
