"""Training diagnostics of the equivariant part: does the decoder use the step, and does the
equivariant loss reach the backbone at all?

    terms = diagnostics(method, batch)     # every run.log_every steps: one extra forward + 2 backward
    # {"diag/recon.own", "diag/recon.other", "diag/recon.own.k1", ..., "diag/grad.inv", "diag/grad.eq",
    #  "diag/grad_ratio"}

- `recon_errors`: per-step MSE of prediction k against its own target u_k and against the other
  steps' targets u_j (j ≠ k). A decoder that ignores k predicts the same image for every k and
  scores own = other; one that follows the path scores own < other. With K = 1 (xattn) "other" is
  the target of another sample of the batch (rolled by one), so own = other means the prediction
  ignores its input.
- `grad_ratio`: ‖∇_θenc (λ · L_eq)‖ / ‖∇_θenc L_inv‖ over the encoder's parameters: the share of
  the backbone's update that the equivariant objective drives (measured ~0.004 for `path` with the
  conv decoder at λ = 1 and per-pixel mean reduction; see docs/DESIGN.md for the reduction choice).
- `difference_images`: |prediction - target| per step, for the reconstruction picture.
"""

from __future__ import annotations

import torch
from torch import nn


def recon_errors(pred: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """pred, targets (B, K, 3, H, W) -> own / other MSE means and own per step (k1..kK)."""
    pred, targets = pred.float(), targets.float()
    b, k = pred.shape[:2]
    # err[b, i, j] = MSE(pred_i, target_j) per sample: (B, K, 1, ...) - (B, 1, K, ...) -> (B, K, K)
    err = (pred[:, :, None] - targets[:, None]).square().flatten(3).mean(-1).mean(0)  # (K, K)
    own = torch.diagonal(err)
    out = {"diag/recon.own": float(own.mean())}
    if k > 1:
        off = ~torch.eye(k, dtype=torch.bool)
        out["diag/recon.other"] = float(err[off].mean())
    else:
        out["diag/recon.other"] = (
            float((pred - targets.roll(1, dims=0)).square().mean()) if b > 1 else float("nan")
        )
    out.update({f"diag/recon.own.k{i + 1}": float(v) for i, v in enumerate(own)})
    return out


def difference_images(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|pred - target| per step, (B, K, 3, H, W), in the images' units (for recon.png)."""
    return (pred.float() - targets.float()).abs()


def _norm(grads) -> float:
    sq = [g.float().square().sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def grad_ratio(method: nn.Module, batch, out: dict | None = None, **forward_args) -> dict[str, float]:
    """Backbone gradient norms of L_inv and λ·L_eq for one batch (torch.autograd.grad on the encoder
    parameters; nothing is accumulated into .grad). -> {"diag/grad.inv", "diag/grad.eq", "diag/grad_ratio"}.
    forward_args: the method's (the teacher temperatures of the step just taken)."""
    params = [p for p in method.encoder.parameters() if p.requires_grad]
    out = out if out is not None else method(batch, **forward_args)
    g_inv = torch.autograd.grad(out["loss/inv"], params, retain_graph=True, allow_unused=True)
    eq = method.lam * out["loss/eq"]
    g_eq = torch.autograd.grad(eq, params, allow_unused=True) if eq.requires_grad else [None]
    n_inv, n_eq = _norm(g_inv), _norm(g_eq)
    return {
        "diag/grad.inv": n_inv,
        "diag/grad.eq": n_eq,
        "diag/grad_ratio": n_eq / n_inv if n_inv > 0 else float("nan"),
    }


@torch.no_grad()
def _restore_buffers(method: nn.Module, saved: list[torch.Tensor]) -> None:
    for buf, old in zip(method.buffers(), saved):
        buf.copy_(old)


def diagnostics(method: nn.Module, batch, recon: bool = True, **forward_args) -> dict[str, float]:
    """grad_ratio, plus (recon) recon_errors for methods that reconstruct; the model's mode is left as it was,
    and so are its buffers: the DINO family's forward moves its teacher centres, which a diagnostic
    pass must not do (a run with diagnostics trains exactly as one without)."""
    saved = [b.detach().clone() for b in method.buffers()]
    try:
        terms = grad_ratio(method, batch, **forward_args)
    finally:
        _restore_buffers(method, saved)
    pred = method.reconstruct(batch) if recon else None
    if pred is not None:
        terms.update(recon_errors(pred, method.targets(batch)))
    return terms
