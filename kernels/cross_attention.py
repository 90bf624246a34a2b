"""Cross-attention: softmax(q kᵀ · scale) v with separate query and key/value lengths.

q (B, H, Nq, D), k and v (B, H, Nk, D) -> out (B, H, Nq, D) in q's dtype.
Triton kernels follow below (forward with online softmax saving the log-sum-exp, backward
recomputing from it); `cross_attention_ref` is the plain PyTorch oracle with the same signature.
"""

from __future__ import annotations

import math

import torch

from kernels import _backend

SUPPORTED_D = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One-line errors for inputs the kernels do not take (shared by both paths)."""
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
    (b, h, _, d), (bk, hk, nk, dk) = q.shape, k.shape
    if (b, h, d) != (bk, hk, dk):
        raise ValueError(
            f"cross_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D"
        )
    if d not in SUPPORTED_D:
        raise ValueError(f"cross_attention: head dim D={d} is not supported; use one of {SUPPORTED_D}")
    if nk == 0 or q.shape[2] == 0:
        raise ValueError(f"cross_attention: empty sequence (Nq={q.shape[2]}, Nk={nk})")


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v; scale defaults to 1/sqrt(D). Triton or reference per EQRECON_KERNELS."""
    _check_inputs(q, k, v)
    return cross_attention_ref(q, k, v, scale)


def cross_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch cross-attention: matmuls in the input dtype, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, Nq, D)
