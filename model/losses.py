"""Loss functions, pure: VICReg, SIE's equivariant prediction loss and the pixel-reconstruction MSE.

Each returns a scalar (and, where there are several terms, a dict of the unweighted terms for
logging). VICReg statistics run in fp32 outside autocast: bf16 covariance sums lose too much.
Under torch.distributed the variance and covariance terms see the global batch (gathered from all
ranks, as in VICReg's and solo-learn's code); the similarity term stays per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


class _GatherBatch(torch.autograd.Function):
    """all_gather along the batch with a gradient: each rank's slice receives the sum over ranks of
    the gradients for it, so that after DDP averages parameter gradients over the W ranks, the
    gathered terms get the gradient of the global loss. all_reduce rather than reduce_scatter,
    which Gloo lacks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W·B, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * b : (rank + 1) * b]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (W·B, D), rank order, differentiable; x itself without distributed.
    Every rank must pass the same B."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherBatch.apply(x)


def _check_batch(x: torch.Tensor, who: str) -> None:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{who}: needs (B, D) embeddings with B >= 2 (over all ranks) for its variance, "
                         f"got {tuple(x.shape)}")


def _variance_covariance(x: torch.Tensor, y: torch.Tensor, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's regularisers of two (B, D) embeddings over the batch gathered from all ranks:
    ((V(x) + V(y)) / 2, C(x) + C(y))."""
    x, y = gather_batch(x), gather_batch(y)
    _check_batch(x, caller)
    return (variance_term(x) + variance_term(y)) / 2, covariance_term(x) + covariance_term(y)


def vicreg_loss(
    a: torch.Tensor, b: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022) on two views' expanded embeddings a, b (B, D).

    loss = sim · MSE(a, b) + std · (V(a) + V(b)) / 2 + cov · (C(a) + C(b)); terms unweighted.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        std_term, cov_term = _variance_covariance(a, b, "vicreg_loss")
        terms = {"sim": F.mse_loss(a, b), "std": std_term, "cov": cov_term}
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
    with torch.autocast(device_type=z1.device.type, enabled=False):
        pred, target, z1 = pred.float(), target.float(), z1.float()
        std_term, cov_term = _variance_covariance(z1, target, "sie_loss")
        terms = {"pred": F.mse_loss(pred, target), "std": std_term, "cov": cov_term}
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
