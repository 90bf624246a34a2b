"""Shared fixtures: the demo shards (converted once per session) and real-photo image oddities; and
the unit lane's rule: a test without the `integration` mark starts no process and no training run."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. The variable must be set before anything
# imports triton, whichever test folder pytest collects first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from photo_oddities import make_oddities

from pipeline.demo import ensure_demo_shards


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Folder of the embedded demo photos converted by pipeline.convert (train and val, 8 per shard)."""
    return ensure_demo_shards(tmp_path_factory.mktemp("demo-shards"))


@pytest.fixture
def one_thread():
    """Run a test single-threaded: tiny models gain nothing from intra-op threads, and on a busy 2-core
    machine oversubscribed threads made such tests ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def oddities() -> Callable[[Path], dict[str, str]]:
    """make_oddities as a fixture, for tests outside tests/pipeline."""
    return make_oddities


# Fixtures that train a whole run: only integration tests may ask for them.
TRAINING_FIXTURES = {"tiny_run", "trained"}


@pytest.fixture(autouse=True)
def _unit_tests_launch_nothing(request, monkeypatch):
    """`make test-fast` is a unit lane: a test not marked `integration` that starts a subprocess, a
    child process (DataLoader workers, a process pool) or a training run (train.loop.train, or a
    fixture that trains) fails here, naming what it started, instead of slowing the lane down."""
    if request.node.get_closest_marker("integration"):
        return
    heavy = TRAINING_FIXTURES.intersection(request.fixturenames)
    if heavy:
        pytest.fail(f"a unit test uses the training fixture {sorted(heavy)}: mark it integration")

    def refuse(what: str):
        def started(*args, **kwargs):
            raise AssertionError(f"a unit test started {what}: mark it @pytest.mark.integration")

        return started

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("a child process"))
    monkeypatch.setattr("train.loop.train", refuse("a training run (train.loop.train)"))
    monkeypatch.setattr("train.main.train", refuse("a training run (train.main.train)"))
