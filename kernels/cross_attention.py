"""Cross-attention, flash style: softmax(q kᵀ · scale) v with separate query and key/value lengths.

q (B, H, Nq, D), k and v (B, H, Nk, D) -> out (B, H, Nq, D) in q's dtype; Nq ≠ Nk and any lengths
(1, 50, 196, 197, 392 ...); D in {32, 64, 128}; fp16, bf16 or fp32 inputs, fp32 accumulation
(fp32 inputs use IEEE fp32 dots, not tf32, to match PyTorch's default matmul).

Forward, one program per (block of BLOCK_M queries, b, h), keys streamed in BLOCK_N blocks with
the online softmax, in base 2 (s = q·k · scale · log2 e):
    m ← max(m, rowmax s),  l ← l·2^(m_old − m) + Σ 2^(s − m),  acc ← acc·2^(m_old − m) + 2^(s − m) v
    out = acc / l,  lse = m + log2 l  (saved, (B·H, Nq) fp32)
Backward recomputes P = 2^(s − lse) block by block instead of storing it:
    delta = rowsum(dO ∘ O);  dV = Pᵀ dO;  dS = P ∘ (dO Vᵀ − delta);  dK = scale · dSᵀ Q;  dQ = scale · dS K
as three launches (delta, then dK/dV with one program per key block, then dQ with one program per
query block), so no atomics and a deterministic result.

Limits: no causal or padding mask (every query sees every key), no dropout, no gradient for `scale`.
Any strides are read through pointer arithmetic (no block pointers: Triton 3.6 to 3.9); outputs are
contiguous. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (slow, for tests).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from kernels import _backend

SUPPORTED_D = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Triton kernels (plain functions; `_backend.kernel_for` compiles or interprets them)
# ---------------------------------------------------------------------------------------------


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

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
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
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
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
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * N_Q + rows, tl.sum(o * do, 1), mask=row_ok)


def _xattn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # one program owns BLOCK_N keys and loops over all queries: dK, dV accumulate in registers
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = cols < N_K

    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :] * svd,
                mask=col_ok[:, None], other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
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
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO Vᵀ)ᵀ
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    out_off = pid_bh * N_K * HEAD_D + cols[:, None] * HEAD_D + offs_d[None, :]  # DK, DV contiguous
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


def _xattn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    H, N_Q, N_K, qk_scale, sm_scale,
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

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * N_Q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * N_Q + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N_K
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * svn + offs_d[:, None] * svd, mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    out_off = pid_bh * N_Q * HEAD_D + rows[:, None] * HEAD_D + offs_d[None, :]  # DQ contiguous
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# GPU candidates (autotuned once per (N_Q, N_K, HEAD_D) and dtype); configs that exceed shared
# memory are skipped by the autotuner (fp32 with D=128 only). Compiled for sm_90 without a GPU,
# bf16 D=64: none spills registers (ptxas -v), every dot is a wgmma. The interpreter takes one fixed, large block: it runs about
# a program per millisecond, so fewer programs is what matters there.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4),
                         (128, 32, 4, 4)])
_DKDV_CONFIGS = _configs([(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 4),
                          (128, 64, 8, 2)])
_DQ_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3), (128, 128, 8, 2)])
_KEY = ["N_Q", "N_K", "HEAD_D"]
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64}
_DELTA_BLOCK_M = 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit dots


def _launch(fn, configs, tensor: torch.Tensor, grid_of, args, **constexprs):
    """Run `fn` on tensor's device: autotuned when compiled, fixed blocks in the interpreter."""
    with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
        if _backend.triton_interprets():
            _backend.kernel_for(fn)[grid_of(_INTERPRET_META)](*args, **constexprs, **_INTERPRET_META)
        else:
            _backend.kernel_for(fn, configs, _KEY)[lambda meta: grid_of(meta)](*args, **constexprs)


def _forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b * h, n_q), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), h, n_q, n_k, scale * LOG2E)
    _launch(_xattn_fwd, _FWD_CONFIGS, q, lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h), args,
            HEAD_D=d, PRECISION=_precision(q.dtype))
    return out, lse


def _backward(q, k, v, out, lse, dout, scale: float, need_dkdv: bool):
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    delta = torch.empty_like(lse)  # (B·H, Nq) fp32
    grid = (triton.cdiv(n_q, _DELTA_BLOCK_M), b * h)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _backend.kernel_for(_xattn_bwd_delta)[grid](out, dout, delta, *out.stride(), *dout.stride(), h, n_q,
                                                    HEAD_D=d, BLOCK_M=_DELTA_BLOCK_M)

    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    consts = {"HEAD_D": d, "PRECISION": _precision(q.dtype)}
    dq = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    dk = dv = None
    if need_dkdv:
        dk = torch.empty((b, h, n_k, d), device=q.device, dtype=k.dtype)
        dv = torch.empty((b, h, n_k, d), device=q.device, dtype=v.dtype)
        args = (q, k, v, dout, lse, delta, dk, dv, *strides, h, n_q, n_k, scale * LOG2E, scale)
        _launch(_xattn_bwd_dkdv, _DKDV_CONFIGS, q, lambda m: (triton.cdiv(n_k, m["BLOCK_N"]), b * h), args,
                **consts)
    args = (q, k, v, dout, lse, delta, dq, *strides, h, n_q, n_k, scale * LOG2E, scale)
    _launch(_xattn_bwd_dq, _DQ_CONFIGS, q, lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b * h), args, **consts)
    return dq, dk, dv


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One-line errors for inputs the kernels do not take (checked on both paths)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"cross_attention: {name} must be (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"cross_attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"cross_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"cross_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"cross_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (b, h, n_q, d), (bk, hk, n_k, dk) = q.shape, k.shape
    if (b, h, d) != (bk, hk, dk):
        raise ValueError(f"cross_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if d not in SUPPORTED_D:
        raise ValueError(f"cross_attention: head dim D={d} is not supported; use one of {SUPPORTED_D}")
    if n_q == 0 or n_k == 0 or b * h == 0:
        raise ValueError(f"cross_attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")


# ---------------------------------------------------------------------------------------------
# Autograd and public functions
# ---------------------------------------------------------------------------------------------

class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.scale, need_dkdv)
        return dq, dk, dv, None


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, scale defaulting to 1/sqrt(D); Triton or reference per EQRECON_KERNELS.

    Under autocast the inputs are cast to the autocast dtype first, as SDPA's are.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _backend.use_triton(q, k, v):
        return _CrossAttention.apply(q, k, v, scale)
    return cross_attention_ref(q, k, v, scale)


def cross_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch cross-attention: matmuls in the input dtype, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, Nq, D)
