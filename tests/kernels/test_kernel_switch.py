"""EQRECON_KERNELS: which path runs, the loud once-only fallback, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kernels import _backend, recon_loss, use_triton


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _backend._warned.clear()
    yield
    _backend._warned.clear()


def test_ref_is_forced(monkeypatch):
    monkeypatch.setenv("EQRECON_KERNELS", "ref")
    assert not use_triton(torch.zeros(1))


def test_auto_on_cpu_is_the_reference_silently(monkeypatch):
    monkeypatch.delenv("EQRECON_KERNELS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not use_triton(torch.zeros(1))


def test_explicit_triton_on_cpu_runs_interpreter(interpreted_kernels):
    assert use_triton(torch.zeros(1))


FALLBACK_SCRIPT = """
import torch
from kernels import cross_attention, cross_attention_ref, recon_loss, recon_loss_ref
q = torch.randn(1, 2, 9, 32, requires_grad=True)
out = cross_attention(q, q, q)
assert "_CrossAttention" not in type(out.grad_fn).__name__, "Triton ran without the interpreter"
assert torch.equal(out, cross_attention_ref(q, q, q))
assert torch.equal(recon_loss(q, q * 2), recon_loss_ref(q, q * 2))
print("ok")
"""


def test_fallback_warns_once_and_matches_reference():
    # a fresh CPU process asking for Triton without the interpreter: one warning, then the reference
    env = {**os.environ, "EQRECON_KERNELS": "triton", "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=root, env=env, capture_output=True, check=False,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert "TRITON_INTERPRET is not 1; falling back to the PyTorch reference" in done.stderr


def test_unknown_value_is_an_error(monkeypatch):
    monkeypatch.setenv("EQRECON_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EQRECON_KERNELS='cuda'"):
        recon_loss(torch.zeros(2, 3), torch.zeros(2, 3))
