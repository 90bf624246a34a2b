"""Fixtures of the train tests: real, tiny demo runs (depth 1 at 32 px) through train/main.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import cpu_args

from train import export
from train.main import main


@pytest.fixture(scope="session")
def tiny_run(demo_shards):
    """-> run(out, *overrides): one real step of the demo preset, tiny, into `out`; its checkpoint."""

    def run(out: Path, *overrides: str) -> Path:
        assert main([*cpu_args(data=demo_shards, out=out, steps=1), "--model.depth=1", *overrides]) == 0
        return out / "ckpt" / "last.pt"

    return run


@pytest.fixture(scope="session")
def trained(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """A 1-step demo run's checkpoint and its export folder (read-only for the tests that share it)."""
    tmp = tmp_path_factory.mktemp("trained")
    ckpt = tiny_run(tmp / "run")
    return ckpt, export.export(ckpt, tmp / "backbone")
