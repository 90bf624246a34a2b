"""Compile, for Hopper (sm_90) and without a GPU, every kernel config the `pytest -m gpu` set can
autotune over, and report per config: compile seconds (CPU time, ptxas included; wall time beside), shared memory, register spills (ptxas -v), and
whether the dots became wgmma. Run in a process without TRITON_INTERPRET, with
TRITON_DUMP_PTXAS_LOG=1 (ptxas's report is printed to stdout, which this script captures per compile).

    python tests/kernels/sm90_compile.py [--quick]    # prints one JSON object

--quick compiles only the first bf16 D=64 candidate of each kernel (the smoke check).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import resource
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernels import _recon_triton as rl
from kernels import _xattn_triton as xa

SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32", "inv_p": "fp32", "grad_scale": "fp32", "eps": "fp32"}
FP32_PTRS = {"LSE", "DELTA", "DQ", "PARTIAL", "BIAS_PARTIAL"}
INTS = {"H", "N_Q", "N_K", "R", "P", "N_BLOCKS", "STEPS", "GRID", "PATCH", "CH"}
TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# What the gpu tests run: tests/kernels/test_cross_attention.py's head dims, every dtype; the recon
# loss at P = 768 (16×16×3 patches) with and without norm_pix, fused (bias gradient) and plain.
GPU_TEST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GPU_TEST_HEAD_DIMS = (64, 128, 32)
RECON_P = 768


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): what a compile costs, however busy
    the machine is (the wall time on a shared CI machine mostly measures the neighbours)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_sm90(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    names = list(inspect.signature(fn).parameters)

    def kind(n):
        if n in constexprs:
            return "constexpr"
        if n in SCALARS:
            return SCALARS[n]
        if n.isupper() and n not in INTS:  # tensors are upper-case
            return "*fp32" if n in FP32_PTRS else "*" + dtype
        return "i32"

    src = ASTSource(
        fn=JITFunction(fn),
        signature={n: kind(n) for n in names},
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    log = io.StringIO()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    wall, seconds = time.perf_counter() - t0, _cpu_seconds() - cpu0
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    return {
        "kernel": fn.__name__,
        "dtype": dtype,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),
        "shared": kernel.metadata.shared,
        "spill_stores": max(spills) if spills else None,
        "wgmma": "wgmma" in kernel.asm["ptx"],
    }


def gpu_test_set(quick: bool) -> list[tuple]:
    """(fn, dtype name, constexprs, warps, stages) for every compile the gpu tests can trigger."""
    jobs = []
    dtypes = (torch.bfloat16,) if quick else GPU_TEST_DTYPES
    head_dims = (64,) if quick else GPU_TEST_HEAD_DIMS
    for dtype in dtypes:
        precision = xa._precision(dtype)
        for d in head_dims:
            for fn, kind, extra in ((xa._xattn_fwd, "fwd", {}), (xa._xattn_bwd, "bwd", {"STORE_DKDV": True})):
                configs = xa.candidates(kind, dtype, d)
                for config in configs[:1] if quick else configs:
                    jobs.append(
                        (
                            fn,
                            TYPE[dtype],
                            {"HEAD_D": d, "PRECISION": precision, **extra, **config.kwargs},
                            config.num_warps,
                            config.num_stages,
                        )
                    )
            jobs.append((xa._xattn_bwd_delta, TYPE[dtype], {"HEAD_D": d, "BLOCK_M": xa._DELTA_BLOCK_M}, 4, 1))
        block_r, block_p, warps = rl._blocks(RECON_P)
        for norm_pix in (False, True):
            for bias_grad in (False, True):
                jobs.append(
                    (
                        rl._recon_fwd,
                        TYPE[dtype],
                        {
                            "NORM_PIX": norm_pix,
                            "WRITE_GRAD": True,
                            "BIAS_GRAD": bias_grad,
                            "IMAGES": False,
                            "BLOCK_R": block_r,
                            "BLOCK_P": block_p,
                        },
                        warps,
                        1,
                    )
                )
    return jobs


def main(argv: list[str]) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    assert os.environ.get("TRITON_DUMP_PTXAS_LOG") == "1", "set TRITON_DUMP_PTXAS_LOG=1 (spill report)"
    rows = [compile_sm90(*job) for job in gpu_test_set("--quick" in argv)]
    print(json.dumps({"total_seconds": round(sum(r["seconds"] for r in rows), 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
