"""Kernel test fixtures: Triton's CPU interpreter for the parity tests, compiled kernels on a GPU.

Triton fixes interpreter mode when it is first imported, so on a machine without CUDA this file
sets TRITON_INTERPRET=1 at import, which works when it runs before anything imported triton (it
does under `make test`, whose tests/kernels is collected first; the Makefile or the top-level
conftest setting it too makes every order safe).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import _backend


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """Route kernels.* through the Triton interpreter on CPU tensors."""
    if not _backend.triton_interprets():
        message = (
            "triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run; "
            "run the tests as `TRITON_INTERPRET=1 python -m pytest tests/kernels`"
        )
        if torch.cuda.is_available():
            pytest.skip(message + " (the gpu-marked tests cover the compiled kernels here)")
        pytest.fail(message)
    monkeypatch.setenv("EQRECON_KERNELS", "triton")
    _backend._warned.clear()


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Route kernels.* through the compiled Triton kernels on CUDA tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _backend.triton_interprets():
        pytest.skip("triton is in interpreter mode (TRITON_INTERPRET=1); run the gpu tests without it")
    monkeypatch.setenv("EQRECON_KERNELS", "triton")
    _backend._warned.clear()
