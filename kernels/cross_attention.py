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
as two launches: delta, then one pass over K/V (one program per key block; 5 matmuls per block, the
exponentials computed once) that sums dQ across key blocks with fp32 atomics (see _xattn_triton.py).

Limits: no causal or padding mask (every query sees every key), no dropout, no gradient for `scale`.
Any strides are read through pointer arithmetic (no block pointers: Triton 3.6 to 3.9); outputs are
contiguous. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (slow, for tests).

The Triton kernels live in `kernels/_xattn_triton.py`, imported only when that path runs, so this
module (and `import model`) works without triton. `self_attention` is the entry for attention of a
sequence over itself: SDPA serves it (FlashAttention/cuDNN on CUDA), nothing here would beat it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import _backend

SUPPORTED_D = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        raise ValueError(
            f"cross_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"cross_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape"
        )
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


def _triton():
    from kernels import _xattn_triton  # triton is imported here, on the Triton path only

    return _xattn_triton


# The Triton path is two torch.library custom ops (forward and backward, each with a fake that gives
# its output shapes), with the backward registered as the forward's autograd formula. torch.compile
# then keeps each kernel in its graph as one opaque node (dynamo cannot trace a Triton launcher, least
# of all the interpreter or the autotuner) and AOTAutograd puts the backward op in the backward graph.
# In eager mode they run exactly what an autograd.Function would: the same launchers, the same saves.


@torch.library.custom_op("eqrecon::cross_attention", mutates_args=())
def _xattn_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, H, Nq, D) in q's dtype, lse (B·H, Nq) fp32, log2 units)."""
    return _triton().forward(q, k, v, scale)


@_xattn_op.register_fake
def _(q, k, v, scale):
    b, h, n_q, d = q.shape
    return q.new_empty((b, h, n_q, d)), q.new_empty((b * h, n_q), dtype=torch.float32)


@torch.library.custom_op("eqrecon::cross_attention_backward", mutates_args=())
def _xattn_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    scale: float,
    need_dkdv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv); dk and dv are empty (0,) tensors when need_dkdv is False (an op returns tensors)."""
    dq, dk, dv = _triton().backward(q, k, v, out, lse, dout, scale, need_dkdv)
    return (dq, dk, dv) if need_dkdv else (dq, q.new_empty(0), q.new_empty(0))


@_xattn_backward_op.register_fake
def _(q, k, v, out, lse, dout, scale, need_dkdv):
    if not need_dkdv:
        return torch.empty_like(q), q.new_empty(0), q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _xattn_setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _xattn_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = _xattn_backward_op(q, k, v, out, lse, dout, ctx.scale, need_dkdv)
    return dq, (dk if need_dkdv else None), (dv if need_dkdv else None), None


_xattn_op.register_autograd(_xattn_backward, setup_context=_xattn_setup)


def _cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton kernel with its gradient: (B, H, Nq, D) each of q; k, v (B, H, Nk, D) -> (B, H, Nq, D)."""
    return _xattn_op(q, k, v, scale)[0]


def _sdpa(backend_name: str):
    """SDPA pinned to one backend (`flash_attention`, `efficient_attention`, `cudnn_attention`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name.upper())

    def run(q, k, v, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


SDPA_CANDIDATES = ("flash_attention", "efficient_attention", "cudnn_attention")


# name -> f(q, k, v, scale): what auto mode times on CUDA
IMPLEMENTATIONS = {
    "triton": _cross_attention_triton,
    **{f"sdpa-{name}": _sdpa(name) for name in SDPA_CANDIDATES},
}


def _fwd_bwd(fn, q, k, v, scale):
    """A no-argument fwd+bwd run of fn on fresh leaves shaped like q, k, v (for auto's timing)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)

    def run():
        with torch.enable_grad():
            torch.autograd.grad(fn(*leaves, scale), leaves, dout)

    return run


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, scale defaulting to 1/sqrt(D); the path per EQRECON_KERNELS.

    Under autocast the inputs are cast to the autocast dtype first, as SDPA's are.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key = ("xattn", str(q.dtype).removeprefix("torch."), "x".join(map(str, (*q.shape, k.shape[2]))))
    with torch.autocast(device_type, enabled=False):  # the inputs are already in their compute dtype
        chosen = _backend.pick(
            "xattn",
            key,
            lambda: {n: _fwd_bwd(f, q, k, v, scale) for n, f in IMPLEMENTATIONS.items()},
            q,
            k,
            v,
        )
        if chosen == "ref":
            return cross_attention_ref(q, k, v, scale)
        return IMPLEMENTATIONS[chosen](q, k, v, scale)


def self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of a sequence over itself, (B, H, N, D) each -> (B, H, N, D): SDPA, whose
    FlashAttention/cuDNN backends serve these shapes on CUDA (and `cross_attention_ref` when
    EQRECON_KERNELS=ref, the parity oracle)."""
    if _backend.mode() == "ref":
        return cross_attention_ref(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def cross_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch cross-attention: matmuls in the input dtype, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, Nq, D)
