"""Every kernel compiles for Hopper (sm_90) without a GPU: catches what the interpreter cannot (dot shape
limits, shared memory per config, register spills, removed APIs such as block pointers) on CPU-only CI,
and bounds the compile time of the whole `pytest -m gpu` set, which a time-boxed GPU job pays first.

Runs tests/kernels/sm90_compile.py in a fresh process without TRITON_INTERPRET, since this session's
triton is in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on H100/H200
GPU_SET_COMPILE_BUDGET_S = 300  # CPU seconds for the whole gpu test set's configs, compiled one after another


def _compile(tmp_path, *flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # an empty cache, or a config compiled before is timed at ~0 s and its ptxas report is missing
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_compile.py")), *flags],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_rows(rows: list[dict]) -> None:
    for r in rows:
        where = (
            f"{r['kernel']} {r['dtype']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']}"
        )
        assert r["shared"] <= SMEM_LIMIT, f"{where}: {r['shared']} B of shared memory"
        assert r["spill_stores"] == 0, f"{where}: spills {r['spill_stores']} B per thread (ptxas -v)"
        # 16-bit dots are wgmma, except the D=128 backward: wgmma needs 64-row blocks, and every 64×64
        # candidate there spilled (16 to 724 B), so it runs spill-free 16×32 blocks on mma.sync instead
        d128_bwd = r["kernel"] == "_xattn_bwd" and r["constexprs"]["HEAD_D"] == 128
        if r["kernel"] in ("_xattn_fwd", "_xattn_bwd") and r["dtype"] != "fp32" and not d128_bwd:
            assert r["wgmma"], f"{where}: no wgmma in the sm_90 PTX"


@pytest.mark.integration
def test_kernels_compile_for_sm90(tmp_path):
    # the first bf16 D=64 candidate of each kernel, the recon loss in every variant
    _check_rows(_compile(tmp_path, "--quick")["rows"])


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_test_set_compiles_without_spills_within_budget(tmp_path):
    # every config the gpu tests can autotune over (pruned by dtype and head dim), compiled in turn
    report = _compile(tmp_path)
    _check_rows(report["rows"])
    assert report["total_seconds"] < GPU_SET_COMPILE_BUDGET_S, (
        f"compiling the gpu test set's {len(report['rows'])} configs took {report['total_seconds']} s; "
        f"slowest: {sorted(report['rows'], key=lambda r: -r['seconds'])[:3]}"
    )
