"""bench/pipeline.py times steady state inside one epoch and sizes the DataLoader's workers to /dev/shm."""

from __future__ import annotations

import collections

import pytest
import torch

from bench import pipeline


class _Batch:
    def __init__(self, b: int):
        self.view1, self.targets = torch.zeros(b, 3, 8, 8), torch.zeros(b, 2, 3, 8, 8)

    def __len__(self):
        return self.view1.shape[0]


class _Loader:
    """A loader of `n` batches of 4 per epoch that records set_epoch calls and the batches handed out."""

    def __init__(self, n: int):
        self.n, self.epochs, self.handed = n, [], 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        for _ in range(self.n):
            self.handed += 1
            yield _Batch(4)


def test_window_is_one_epoch_without_warmup_or_tail():
    loader = _Loader(12)
    row = pipeline.measure(loader, torch.device("cpu"), warmup=3)
    assert loader.epochs == [0]  # one epoch: no rebuild, no second epoch inside the window
    assert loader.handed == 12  # the tail is still read (untimed), so the epoch ends cleanly
    assert row["timed_batches"] == 12 - 3 - pipeline.TAIL and row["samples"] == 4 * row["timed_batches"]
    assert row["samples_per_s"] > 0 and row["shape_targets"] == [2, 3, 8, 8]


def test_too_small_a_dataset_is_an_error():
    with pytest.raises(SystemExit, match="too few for 3 warm-up"):
        pipeline.measure(_Loader(3 + pipeline.MIN_TIMED + pipeline.TAIL - 1), torch.device("cpu"), warmup=3)


def test_workers_fit_dev_shm(monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    per_worker = int(pipeline.batch_bytes(256, 224) * pipeline.PREFETCH * 1.25)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: usage(0, 0, 3 * per_worker + 1))
    workers, record = pipeline.shm_workers(16, 256, 224)
    assert workers == 3 and record["workers_limited_by_shm"]
    assert pipeline.shm_workers(2, 256, 224)[0] == 2
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: usage(0, 0, per_worker - 1))
    assert pipeline.shm_workers(16, 256, 224)[0] == 0
