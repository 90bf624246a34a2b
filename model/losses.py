"""Loss functions, pure: VICReg, SIE (its official composition) and the pixel-reconstruction MSE.

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
        raise ValueError(
            f"{who}: needs (B, D) embeddings with B >= 2 (over all ranks) for its variance, "
            f"got {tuple(x.shape)}"
        )


def _variance_covariance(x: torch.Tensor, y: torch.Tensor, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's regularisers of two (B, D) embeddings over the batch gathered from all ranks:
    ((V(x) + V(y)) / 2, C(x) + C(y))."""
    x, y = gather_batch(x), gather_batch(y)
    _check_batch(x, caller)
    return (variance_term(x) + variance_term(y)) / 2, covariance_term(x) + covariance_term(y)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def vicreg_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    sim: float = 25.0,
    std: float = 25.0,
    cov: float = 1.0,
    joint: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022) on two views' expanded embeddings a, b (B, D).

    loss = sim · MSE(a, b) + std · (V(a) + V(b)) / 2 + cov · (C(a) + C(b)); terms unweighted.
    joint = (a_eq, b_eq) (B, De): an equivariant part's projections, regularised together with a and b
    (V and C of [a | a_eq] and [b | b_eq], so the cross-block covariances count) and left out of the
    similarity: SIE's invariant loss.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = _at_least_fp32(a), _at_least_fp32(b)
        x, y = a, b
        if joint is not None:
            x = torch.cat([a, _at_least_fp32(joint[0])], dim=1)
            y = torch.cat([b, _at_least_fp32(joint[1])], dim=1)
        std_term, cov_term = _variance_covariance(x, y, "vicreg_loss")
        terms = {"sim": F.mse_loss(a, b), "std": std_term, "cov": cov_term}
    loss = sim * terms["sim"] + std * terms["std"] + cov * terms["cov"]
    return loss, terms


def sie_prediction_loss(
    pred: torch.Tensor, y_eq: torch.Tensor, sim: float = 10.0, std: float = 10.0, equi_factor: float = 4.5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SIE's equivariant term: equi_factor · sim · MSE(pred, y_eq) + std · V(pred) / 2, V over the
    batch gathered from all ranks. pred, y_eq (B, De) -> (loss, {"pred", "pred_std"} unweighted)."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, y_eq = _at_least_fp32(pred), _at_least_fp32(y_eq)
        terms = {"pred": F.mse_loss(pred, y_eq), "pred_std": variance_term(gather_batch(pred)) / 2}
    return equi_factor * sim * terms["pred"] + std * terms["pred_std"], terms


def sie_loss(
    x_inv: torch.Tensor,
    y_inv: torch.Tensor,
    x_eq: torch.Tensor,
    y_eq: torch.Tensor,
    pred: torch.Tensor,
    sim: float = 10.0,
    std: float = 10.0,
    cov: float = 1.0,
    equi_factor: float = 4.5,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """SIE (Garrido et al. 2023; the official `SIE.forward`) on projected embeddings, as the composed
    methods compute it: VICReg's invariant loss with the equivariant projections joint
    (model/invariant.py) plus SIE's prediction term (model/equivariant.py).

    x_inv, y_inv (B, Di): the invariant projections of views 1, 2; x_eq, y_eq (B, De): the equivariant
    ones; pred (B, De): the predictor's estimate of y_eq from x_eq and the transformation.

        inv = sim · MSE(x_inv, y_inv) + std · (V(x) + V(y)) / 2 + cov · (C(x) + C(y)),  x = [x_inv | x_eq]
        eq  = equi_factor · sim · MSE(pred, y_eq) + std · V(pred) / 2
    -> (inv, eq, unweighted terms); inv + eq is the official loss. Defaults: the official ones.
    """
    inv, terms = vicreg_loss(x_inv, y_inv, sim, std, cov, joint=(x_eq, y_eq))
    eq, eq_terms = sie_prediction_loss(pred, y_eq, sim, std, equi_factor)
    return inv, eq, {**terms, **eq_terms}


def recon_mse(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean pixel MSE of patches pred (B, K, N, P) against target patches (B, K, N, P) or images
    (B, K, 3, Ht, Wt) (read in place); per-patch normalised targets if norm_pix."""
    return kernels.recon_loss(pred, target, norm_pix)


def recon_mse_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    norm_pix: bool = False,
) -> torch.Tensor:
    """recon_mse(hidden @ weightᵀ + bias, target) fused with the pixel head: hidden (B, K, N, C),
    weight (P, C), bias (P,), target (B, K, N, P) patches or (B, K, 3, Ht, Wt) images."""
    return kernels.recon_loss_linear(hidden, weight, bias, target, norm_pix)
