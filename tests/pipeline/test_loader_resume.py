"""Loader state never rewinds a running epoch: both loaders, 1 and 2 ranks, driven as train/loop.py drives
them (set_epoch at the top of an epoch, a state_dict after any batch, resume = set_epoch + load_state_dict
and then iterate without set_epoch). A checkpoint at every position of an epoch, its last batch included,
resumes into exactly the batches of the straight run."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import dali_available
from pipeline.batch import DataConfig
from pipeline.dali import build_dali_loader
from pipeline.path import PathConfig
from pipeline.reference import build_reference_loader

EPOCHS = 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny images: intra-op threads only add contention
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
DALI = pytest.param("dali", 1, marks=NEEDS_DALI)


def _cfg(data_dir, loader: str, workers: int) -> DataConfig:
    # 64 demo photos, a global batch of 16: 4 batches per epoch on 1 rank and on each of 2 ranks. θ (crop
    # boxes, flips, rotation) identifies a batch; colour, blur and targets would only cost time.
    return DataConfig(
        dir=str(data_dir),
        loader=loader,
        img_size=16,
        batch_size=16,
        workers=workers,
        shuffle_buffer=16,
        aug=PathConfig(transforms=("rotation",), k=0),
    )


def _build(cfg: DataConfig, rank: int, world: int):
    build = build_dali_loader if cfg.loader == "dali" else build_reference_loader
    return build(cfg, cfg.dir, rank, world)


def drive(
    loader, total: int, epoch: int = 0, state: dict | None = None
) -> tuple[list[torch.Tensor], list[dict]]:
    """train/loop.py's calling order for `total` batches -> (θ of each batch, the state after each batch)."""
    thetas, states, resumed = [], [], state is not None
    if resumed:
        loader.set_epoch(epoch)
        loader.load_state_dict(state)
    while len(thetas) < total:
        if not resumed:
            loader.set_epoch(epoch)
        yielded, may_be_empty, resumed = 0, resumed, False  # only a resumed epoch may have nothing left
        for batch in loader:
            thetas.append(batch.theta)
            states.append(json.loads(json.dumps(loader.state_dict())))  # what a checkpoint file keeps
            yielded += 1
            if len(thetas) == total:
                break
        else:
            epoch += 1
        if yielded == 0 and not may_be_empty:
            raise AssertionError(f"the loader yielded no batch in epoch {epoch - 1}")
    return thetas, states


@pytest.mark.integration
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("loader, workers", [("reference", 0), ("reference", 2), DALI])
def test_a_checkpoint_at_every_position_resumes_into_the_straight_run(demo_shards, loader, workers, world):
    if loader == "reference" and workers and world == 2:
        pytest.skip("worker roles on one rank are covered by world=1; two ranks × two workers only add time")
    cfg = _cfg(demo_shards, loader, workers)
    for rank in range(world):
        length = len(_build(cfg, rank, world))
        assert length == 4
        # the straight run takes a state after every batch, the last of each epoch included: the
        # reference loader used to end its running epoch there ("streams ended after 0 of 4 batches")
        straight, states = drive(_build(cfg, rank, world), EPOCHS * length)
        assert len(straight) == EPOCHS * length
        assert [(s["epoch"], s["batch"]) for s in states[: length + 1]] == [
            (0, b) for b in range(1, length + 1)
        ] + [(1, 1)]
        assert not torch.equal(straight[0], straight[length])  # epoch 1 is reshuffled, not epoch 0 again
        for done in range(1, length + 2):  # every position of epoch 0 and the first of epoch 1
            state = states[done - 1]
            rest, _ = drive(_build(cfg, rank, world), EPOCHS * length - done, state["epoch"], state)
            assert len(rest) == EPOCHS * length - done, (rank, done)
            for i, (got, want) in enumerate(zip(rest, straight[done:])):
                assert torch.equal(got, want), (
                    f"rank {rank}: resumed after batch {done}, batch {done + i} differs"
                )


@pytest.mark.parametrize("loader, workers", [("reference", 0), DALI])
def test_state_dict_does_not_move_the_loader(demo_shards, loader, workers):
    ld = _build(_cfg(demo_shards, loader, workers), 0, 1)
    it = iter(ld)
    seen = [next(it) for _ in range(len(ld))]
    assert ld.state_dict()["batch"] == ld.state_dict()["batch"] == len(ld) == len(seen)
    assert list(it) == []  # the epoch ends normally after a state taken on its last batch
    assert (ld.state_dict()["epoch"], ld.state_dict()["batch"]) == (0, len(ld))
    ld.set_epoch(0)  # the finished epoch is not rewound ...
    assert list(ld) == []
    assert len(list(ld)) == len(ld)  # ... and a plain loop over epochs moves on to the next one
    assert ld.state_dict()["epoch"] == 1


def test_a_state_written_before_the_fix_resumes_at_the_end_of_its_epoch(demo_shards):
    # the reference loader used to store a checkpoint on epoch 0's last batch as (1, 0), with the
    # trainer's epoch 0; the trainer then replayed epoch 1 and found the next one empty
    cfg = _cfg(demo_shards, "reference", 0)
    length = len(_build(cfg, 0, 1))
    straight, states = drive(_build(cfg, 0, 1), 3 * length)
    old = {**states[length - 1], "epoch": 1, "batch": 0}
    rest, _ = drive(_build(cfg, 0, 1), 2 * length, epoch=0, state=old)
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[length:], strict=True))
