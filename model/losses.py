"""Loss functions, pure: VICReg, SIE's equivariant prediction loss and the pixel-reconstruction MSE.

Each returns a scalar (and, where there are several terms, a dict of the unweighted terms for
logging). VICReg statistics run in fp32 outside autocast: bf16 covariance sums lose too much.
Statistics are over the local batch (per rank under DDP), as in solo-learn's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

VAR_EPS = 1e-4  # VICReg: std = sqrt(var + eps)


def variance_term(x: torch.Tensor) -> torch.Tensor:
    """Hinge on the per-dimension std: mean_d relu(1 - std_d). x (B, D) -> scalar."""
    std = torch.sqrt(x.var(dim=0) + VAR_EPS)
    return F.relu(1.0 - std).mean()


def covariance_term(x: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances divided by D. x (B, D) -> scalar."""
    b, d = x.shape
    x = x - x.mean(dim=0)
    cov = (x.T @ x) / (b - 1)  # (D, D)
    off_diag = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diag.square().sum() / d


def _check_batch(x: torch.Tensor, who: str) -> None:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{who}: needs (B, D) embeddings with B >= 2 per rank for its variance, got {tuple(x.shape)}")


def vicreg_loss(
    a: torch.Tensor, b: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022) on two views' expanded embeddings a, b (B, D).

    loss = sim · MSE(a, b) + std · (V(a) + V(b)) / 2 + cov · (C(a) + C(b)); terms unweighted.
    """
    _check_batch(a, "vicreg_loss")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        terms = {
            "sim": F.mse_loss(a, b),
            "std": (variance_term(a) + variance_term(b)) / 2,
            "cov": covariance_term(a) + covariance_term(b),
        }
    loss = sim * terms["sim"] + std * terms["std"] + cov * terms["cov"]
    return loss, terms


def sie_loss(
    pred: torch.Tensor, target: torch.Tensor, z1: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SIE's equivariant loss (Garrido et al. 2023) on pooled z_eq.

    pred (B, d_eq): the predictor's estimate of z_eq(view 2) from z_eq(view 1) and θ;
    target (B, d_eq): z_eq(view 2) (not detached, as in SIE); z1 (B, d_eq): z_eq(view 1).
    loss = sim · MSE(pred, target) + std · (V(z1) + V(target)) / 2 + cov · (C(z1) + C(target)).
    Without the variance/covariance terms, z_eq collapsing to a constant would solve the prediction,
    so the equivariant part gets the same regularisation VICReg gives the invariant one.
    """
    _check_batch(z1, "sie_loss")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        pred, target, z1 = pred.float(), target.float(), z1.float()
        terms = {
            "pred": F.mse_loss(pred, target),
            "std": (variance_term(z1) + variance_term(target)) / 2,
            "cov": covariance_term(z1) + covariance_term(target),
        }
    loss = sim * terms["pred"] + std * terms["std"] + cov * terms["cov"]
    return loss, terms


def recon_mse(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean pixel MSE of patches pred, target (B, K, N, P); per-patch normalised targets if norm_pix."""
    return kernels.recon_loss(pred, target, norm_pix)


def recon_mse_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """recon_mse(hidden @ weightᵀ + bias, target) fused with the pixel head: hidden (B, K, N, C),
    weight (P, C), bias (P,), target (B, K, N, P)."""
    return kernels.recon_loss_linear(hidden, weight, bias, target, norm_pix)
