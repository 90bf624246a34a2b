"""Fault injection into a running DALI loader: a shard truncated between epochs or while the reader
runs is a named ShardError, never a signal (DALI reads shards with read(), not mmap).

The loader runs in a spawned child process, so a SIGBUS would fail the test instead of killing pytest.
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
from pathlib import Path

import pytest

from pipeline import dali_available
from pipeline.batch import DataConfig
from pipeline.dali import build_dali_loader
from pipeline.errors import ShardError
from pipeline.path import PathConfig

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
pytestmark = NEEDS_DALI


def _cfg(data_dir: Path) -> DataConfig:
    return DataConfig(
        dir=str(data_dir),
        img_size=16,
        batch_size=8,
        workers=1,
        shuffle_buffer=8,
        aug=PathConfig(transforms=("rotation",), k=0),
    )


def _truncate(tars: list[Path]) -> None:
    for tar in tars:
        tar.write_bytes(tar.read_bytes()[:3000])


def _run(data_dir: str, when: str, report) -> None:
    """Child process: one batch, truncate the shards (`when` = "running": now; "between": after the
    epoch), carry on; report the outcome as (error class name, message) or ("finished", batches)."""
    data_dir = Path(data_dir)
    loader = build_dali_loader(_cfg(data_dir), data_dir)
    tars = sorted(data_dir.glob("train-*.tar"))
    try:
        it = iter(loader)
        next(it)
        if when == "running":
            _truncate(tars)
        n = 1 + sum(1 for _ in it)
        if when == "between":
            _truncate(tars)
            loader.set_epoch(1)
            n += sum(1 for _ in loader)
        report.put(("finished", str(n)))
    except ShardError as e:
        report.put((type(e).__name__, str(e)))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("when", ["running", "between"])
def test_a_shard_truncated_under_the_reader_is_a_named_error(demo_shards, tmp_path, when):
    data = tmp_path / "shards"
    shutil.copytree(demo_shards, data)
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    child = ctx.Process(target=_run, args=(str(data), when, report))
    child.start()
    child.join(timeout=240)
    assert child.exitcode is not None, "the loader hung after the truncation"
    assert child.exitcode != -signal.SIGBUS, "DALI died of SIGBUS: the shard was memory-mapped"
    assert child.exitcode == 0, f"the child died with exit code {child.exitcode}"
    kind, message = report.get(timeout=5)
    assert kind == "ShardError", (kind, message)
    assert "is truncated" in message and ".tar" in message and "\n" not in message
