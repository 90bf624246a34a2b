"""Shared fixtures: the demo shards (converted once per session) and real-photo image oddities."""

from __future__ import annotations

import os
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
