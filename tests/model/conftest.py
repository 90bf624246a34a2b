"""Model tests run single-threaded: tiny models gain nothing from intra-op threads, and on a busy
2-core machine oversubscribed threads made them ten times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
