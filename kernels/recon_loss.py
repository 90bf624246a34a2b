"""Pixel-MSE reconstruction loss, fused: mean((pred - t)²) with t the (optionally normalised) target.

pred and target (B, K, N, P) -> scalar fp32. With `norm_pix`, each target patch is normalised over
its P values: t = (target - mean) / sqrt(var + 1e-6) with the biased variance (divided by P, not
P - 1): MAE uses the unbiased one, but the biased one is what a one-pass kernel computes and it is
defined for P = 1; for P = 768 the two differ by 0.07%. `recon_loss_linear` takes the decoder's
hidden state and pixel head instead of `pred`. Triton kernels follow below; `*_ref` are the oracles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import _backend

NORM_PIX_EPS = 1e-6
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_pair(pred: torch.Tensor, target: torch.Tensor, who: str = "recon_loss") -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{who}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 2 or pred.numel() == 0:
        raise ValueError(f"{who}: expected non-empty (B, K, N, P) tensors, got shape {tuple(pred.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{who}: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if pred.device != target.device:
        raise ValueError(f"{who}: pred on {pred.device} but target on {target.device}")


def _normalise(target: torch.Tensor) -> torch.Tensor:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, unbiased=False, keepdim=True)
    return (target - mean) / torch.sqrt(var + NORM_PIX_EPS)


def recon_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error over all elements (fp32 scalar). Triton or reference per EQRECON_KERNELS."""
    _check_pair(pred, target)
    return recon_loss_ref(pred, target, norm_pix)


def recon_loss_ref(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Plain PyTorch pixel MSE in fp32."""
    t = target.float()
    if norm_pix:
        t = _normalise(t)
    return (pred.float() - t).square().mean()


def _check_linear(hidden, weight, bias, target) -> None:
    if hidden.dim() < 2 or weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"recon_loss_linear: want hidden (B, K, N, C), weight (P, C), bias (P,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    p, c = weight.shape
    if hidden.shape[-1] != c or bias.shape[0] != p or target.shape != (*hidden.shape[:-1], p):
        raise ValueError(
            f"recon_loss_linear: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, bias "
            f"{tuple(bias.shape)} and target {tuple(target.shape)} do not fit (hidden[..., C] @ weight(P, C)ᵀ "
            f"must match target[..., P])"
        )


def recon_loss_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """recon_loss(hidden @ weightᵀ + bias, target) without materialising the prediction."""
    _check_linear(hidden, weight, bias, target)
    return recon_loss_linear_ref(hidden, weight, bias, target, norm_pix)


def recon_loss_linear_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Plain PyTorch: the pixel head, then `recon_loss_ref`."""
    return recon_loss_ref(F.linear(hidden, weight, bias), target, norm_pix)
