"""EQRECON_KERNELS: which path runs, the loud once-only fallback, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _backend, recon_loss, use_triton
from pipeline.errors import ConfigError


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


WORKER = str(Path(__file__).with_name("fallback_worker.py"))


@pytest.mark.integration
def test_fallback_warns_once_and_matches_reference():
    # a fresh CPU process asking for Triton without the interpreter: one warning, then the reference
    env = {**os.environ, "EQRECON_KERNELS": "triton", "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, WORKER],
        cwd=root,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert "TRITON_INTERPRET is not 1; falling back to the PyTorch reference" in done.stderr


def test_unknown_value_is_an_error(monkeypatch):
    monkeypatch.setenv("EQRECON_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="EQRECON_KERNELS='cuda'"):
        recon_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# auto: the fastest candidate per shape, timed once, printed once, listed by kernels.choices()
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_timer(monkeypatch):
    """_backend.time_ms replaced by a table fn -> ms (None: the candidate raises), counting calls."""
    table: dict = {}
    calls: list = []

    def fake(fn):
        calls.append(fn)
        if table[fn] is None:
            raise RuntimeError("No available kernel. Aborting execution.")
        return table[fn]

    monkeypatch.setattr(_backend, "time_ms", fake)
    monkeypatch.setattr(_backend, "_choices", {})
    return table, calls


def _candidates(table, **ms):
    fns = {name: (lambda: None) for name in ms}
    table.update({fns[name]: t for name, t in ms.items()})
    return lambda: dict(fns)


def test_auto_keeps_the_fastest_and_times_each_shape_once(fake_timer, capsys):
    table, calls = fake_timer
    make = _candidates(table, triton=0.8, **{"sdpa-flash_attention": 0.5, "sdpa-cudnn_attention": None})
    key = ("xattn", "bfloat16", "8x3x392x392x64")
    assert _backend.auto_choice("xattn", key, make) == "sdpa-flash_attention"
    assert _backend.auto_choice("xattn", key, make) == "sdpa-flash_attention"
    assert len(calls) == 3  # the second call reuses the first call's timing
    record = kernels.choices()["xattn bfloat16 8x3x392x392x64"]
    assert record == {
        "chosen": "sdpa-flash_attention",
        "ms": {"triton": 0.8, "sdpa-flash_attention": 0.5, "sdpa-cudnn_attention": None},
    }
    err = capsys.readouterr().err
    assert err.count("eqrecon.kernels: xattn bfloat16 8x3x392x392x64 -> sdpa-flash_attention") == 1, err
    # a new shape is timed again, independently
    make2 = _candidates(table, triton=0.2, **{"sdpa-flash_attention": 0.5})
    assert _backend.auto_choice("xattn", ("xattn", "bfloat16", "8x3x196x196x64"), make2) == "triton"
    assert len(kernels.choices()) == 2


def test_auto_without_triton_times_only_the_pytorch_candidates(fake_timer):
    table, calls = fake_timer
    make = _candidates(table, triton=0.1, ref=2.0, compile=1.5)
    assert _backend.auto_choice("recon", ("recon", "x"), make, without_triton=True) == "compile"
    assert "triton" not in kernels.choices()["recon x"]["ms"] and len(calls) == 2


def test_auto_with_every_candidate_failing_uses_the_reference(fake_timer):
    table, _ = fake_timer
    make = _candidates(table, triton=None, **{"sdpa-flash_attention": None})
    assert _backend.auto_choice("xattn", ("xattn", "y"), make) == "ref"


def test_forced_modes_do_not_time(fake_timer, monkeypatch):
    _, calls = fake_timer
    for mode, want in (("ref", "ref"), ("auto", "ref")):  # auto on CPU tensors: the reference
        monkeypatch.setenv("EQRECON_KERNELS", mode)
        assert _backend.pick("xattn", ("k",), lambda: {"triton": lambda: None}, torch.zeros(1)) == want
    assert calls == [] and kernels.choices() == {}


# ---------------------------------------------------------------------------------------------
# lazy triton: the package imports, and falls back, where triton does not import
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_kernels_and_model_import_without_triton_and_fall_back_once():
    env = {**os.environ, "EQRECON_KERNELS": "triton", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, WORKER, "--no-triton"],
        cwd=root,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert "triton does not import (ModuleNotFoundError" in done.stderr
