"""The Triton side of `kernels.cross_attention`: kernels, autotune candidates and launchers.

Imported only when the Triton path runs (`kernels.cross_attention` imports it lazily), so that
`import kernels` works where triton does not import. The maths is in cross_attention.py's docstring.

Backward in one pass over K/V (FlashAttention-2's order): one program owns BLOCK_N keys and walks
all query blocks, computing per block the 5 products
    Sᵀ = K Qᵀ,  dV += Pᵀ dO,  dPᵀ = V dOᵀ,  dK += dSᵀ Q,  dQ += dS K
with P = 2^(S − lse) recomputed once. dK, dV accumulate in registers; dQ is summed across key
blocks with fp32 atomics into a zeroed (B, H, Nq, D) buffer, so dQ is exact to fp32 rounding but
its summation order (and last bits) can change from run to run.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import _backend

LOG2E = 1.4426950408889634


def _xattn_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, N_Q, N_K, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = rows < N_Q

    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )  # (BLOCK_M, D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N_K
        # kᵀ loaded directly as (D, BLOCK_N); padded keys are zeros, then masked to -inf below
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # every key block holds at least one real key, so m_new is finite and alpha is well defined
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod,
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + pid_bh * N_Q + rows, m_i + tl.log2(l_i), mask=row_ok)


def _xattn_bwd_delta(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, N_Q,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = rows < N_Q
    o = tl.load(
        O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod, mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    tl.store(DELTA + pid_bh * N_Q + rows, tl.sum(o * do, 1), mask=row_ok)


def _xattn_bwd(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    STORE_DKDV: tl.constexpr,
):  # fmt: skip
    # one program owns BLOCK_N keys and loops over all queries: dK, dV accumulate in registers,
    # dQ (fp32, pre-zeroed, contiguous) receives this key block's share by atomic adds
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = cols < N_K

    k = tl.load(
        K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0
    )  # (BLOCK_N, D)
    v = tl.load(
        V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0
    )
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    dq_base = DQ + pid_bh.to(tl.int64) * N_Q * HEAD_D
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N_Q
        q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh * N_Q + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * N_Q + rows, mask=row_ok, other=0.0)
        # transposed scores (BLOCK_N, BLOCK_M) so that dV and dK need no transposed operand
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # 1: Sᵀ
        pt = tl.exp2(st - lse[None, :])  # the only exponentials of the backward
        pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)  # 2: dV
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # 3: dPᵀ = (dO Vᵀ)ᵀ
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=PRECISION)  # 4: dK
        dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION)  # 5: this key block's part of dQ
        tl.atomic_add(dq_base + rows[:, None] * HEAD_D + offs_d[None, :], dq * sm_scale, mask=row_ok[:, None])

    if STORE_DKDV:
        out_off = pid_bh * N_K * HEAD_D + cols[:, None] * HEAD_D + offs_d[None, :]  # DK, DV contiguous
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Autotune candidates, pruned by dtype and head dim before anything compiles
# ---------------------------------------------------------------------------------------------


def _configs(pairs) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), per family. Every candidate was compiled for sm_90 with
# ptxas -v and none spills registers (tests/kernels/test_sm90_compile.py checks each one the gpu tests
# can try, and bounds their total compile time). fp32 gets one small config: its IEEE dots cannot use
# the 16-bit tensor cores, larger blocks spilled up to 33 KB per thread and took minutes to compile,
# and fp32 is a parity mode, not a training mode. The 16-bit D=128 backward has one config: wgmma needs
# 64-row blocks, and every 64×64 candidate spilled there (16 to 724 B), so it runs 16×32 on mma.sync.
FWD_CONFIGS = {
    "16bit": _configs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)]),
    "16bit_d128": _configs([(128, 64, 8, 2), (64, 64, 4, 2)]),
    "fp32": _configs([(32, 16, 4, 1)]),
    "fp32_d128": _configs([(16, 16, 4, 1)]),
}
BWD_CONFIGS = {
    "16bit": _configs([(32, 64, 4, 3), (64, 128, 8, 2)]),
    "16bit_d128": _configs([(16, 32, 4, 2)]),
    "fp32": _configs([(16, 16, 4, 1)]),
    "fp32_d128": _configs([(16, 16, 4, 1)]),
}
_KEY = ["N_Q", "N_K", "HEAD_D"]  # the autotuner also keys on every tensor argument's dtype
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64}
_DELTA_BLOCK_M = 32  # 64 spilled a little for fp16 at D=64


def config_family(dtype: torch.dtype, head_d: int) -> str:
    """Which candidate list serves this dtype and head dim."""
    family = "fp32" if dtype == torch.float32 else "16bit"
    return family + "_d128" if head_d > 64 else family


def _prune(table: dict):
    def prune(configs, named_args, **kwargs):
        return table[config_family(named_args["Q"].dtype, kwargs["HEAD_D"])]

    return prune


def candidates(kind: str, dtype: torch.dtype, head_d: int) -> list:
    """The configs the autotuner tries for `kind` ('fwd' or 'bwd') at this dtype and head dim."""
    return {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}[kind][config_family(dtype, head_d)]


def _all(table: dict) -> list:
    return [c for family in table.values() for c in family]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit dots


def _launch(fn, table, tensor: torch.Tensor, grid_of, args, reset=(), **constexprs):
    """Run `fn` on tensor's device: autotuned when compiled, fixed blocks in the interpreter."""
    with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
        if _backend.triton_interprets():
            _backend.kernel_for(fn)[grid_of(_INTERPRET_META)](*args, **constexprs, **_INTERPRET_META)
        else:
            kernel = _backend.kernel_for(
                fn, _all(table), _KEY, prune=_prune(table), reset_to_zero=list(reset)
            )
            kernel[lambda meta: grid_of(meta)](*args, **constexprs)


def forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, D) in q's dtype, lse (B·H, Nq) fp32 in log2 units)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b * h, n_q), device=q.device, dtype=torch.float32)
    args = (
        q,
        k,
        v,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        h,
        n_q,
        n_k,
        scale * LOG2E,
    )
    _launch(
        _xattn_fwd,
        FWD_CONFIGS,
        q,
        lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h),
        args,
        HEAD_D=d,
        PRECISION=_precision(q.dtype),
    )
    return out, lse


def backward(q, k, v, out, lse, dout, scale: float, need_dkdv: bool):
    """(dq, dk, dv) in the inputs' dtypes; dk, dv are None when need_dkdv is False."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    delta = torch.empty_like(lse)  # (B·H, Nq) fp32: rowsum(dO ∘ O)
    grid = (triton.cdiv(n_q, _DELTA_BLOCK_M), b * h)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _backend.kernel_for(_xattn_bwd_delta)[grid](
            out, dout, delta, *out.stride(), *dout.stride(), h, n_q, HEAD_D=d, BLOCK_M=_DELTA_BLOCK_M
        )

    dq = torch.zeros((b, h, n_q, d), device=q.device, dtype=torch.float32)  # atomically accumulated
    dk = torch.empty((b, h, n_k, d), device=q.device, dtype=k.dtype) if need_dkdv else dq
    dv = torch.empty((b, h, n_k, d), device=q.device, dtype=v.dtype) if need_dkdv else dq
    args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        h,
        n_q,
        n_k,
        scale * LOG2E,
        scale,
    )
    _launch(
        _xattn_bwd,
        BWD_CONFIGS,
        q,
        lambda m: (triton.cdiv(n_k, m["BLOCK_N"]), b * h),
        args,
        reset=("DQ",),
        HEAD_D=d,
        PRECISION=_precision(q.dtype),
        STORE_DKDV=need_dkdv,
    )
    return dq.to(q.dtype), (dk if need_dkdv else None), (dv if need_dkdv else None)
