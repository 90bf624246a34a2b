"""The probes' heads and scores: R² formulas, the MLP regressor of θ, softmax regression and k-NN.

The equivariance probe's default readout is ridge regression (train/probe_ridge.py); the MLP
protocols for the θ regressor (`PROTOCOLS`) are kept for the papers' protocol and comparisons:
    fast  a 3-layer MLP (256 hidden, ReLU) on standardised inputs, AdamW, early-stopped on held-out
          training photos (the best epoch after at least one: never the untrained head); inputs wider
          than 2048 are first projected onto their top 2048 principal components (fitted on the
          training rows), which keeps `tokens` pooling cheap;
    sie   SIE's eval_angle_prediction.py: Linear(2D, 1024)-ReLU-Linear(1024, 1024)-ReLU-Linear(1024, p),
          Adam lr 1e-3, no weight decay, batch 256, 50 epochs, raw features and targets, the last epoch's
          model; report r2_sie (SIE's global-mean R²) beside the papers.
Both score on pairs of held-out source photos (`groups`): never a photo on both sides.

    r2       = mean_j [1 - Σ_i (y_ij - ŷ_ij)² / Σ_i (y_ij - ȳ_j)²]   per-dimension, uniform average
                                                                   (scikit-learn's r2_score)
    r2_sie   = 1 - Σ_ij (y_ij - ŷ_ij)² / Σ_ij (y_ij - ȳ)²,  ȳ = the mean of all entries   (SIE's code)

Both equal the usual R² for 1-D targets. For several dimensions r2_sie weights each entry by its raw
scale and credits predicting each dimension's own mean (crop: near 0.9 for a backbone that knows
nothing); read r2 there. The probe seed picks the held-out photos, the inner validation photos, the
head's init and the minibatch order; the pairs themselves do not depend on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ProbeError


def r2_per_dim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """scikit-learn's r2_score (multioutput='uniform_average'): (N, P), (N, P) -> scalar.

    A dimension with no variance scores 1 if predicted exactly and 0 otherwise (as scikit-learn does).
    """
    pred, target = pred.double().reshape(len(pred), -1), target.double().reshape(len(target), -1)
    ss_res = ((target - pred) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).double())
    return float(r2.mean())


def r2_global(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SIE's R²: one global mean over every entry of the target. (N, P), (N, P) -> scalar."""
    pred, target = pred.double(), target.double()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1 - ((target - pred) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def mlp(d_in: int, d_out: int, hidden: int = 1024, zero_last: bool = True) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear (SIE's probe head). zero_last: the last layer starts at zero, so
    an untrained head predicts the (standardised) training mean, R² ≈ 0, never worse."""
    net = nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


@dataclass
class FitConfig:
    """How a probe head is trained (`PROTOCOLS` holds the two named settings)."""

    hidden: int = 256
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam
    standardise: bool = True  # inputs and targets to zero mean, unit std (train statistics)
    early_stop: bool = True  # keep the best epoch on held-out training photos (else the last)
    patience: int = 6  # epochs without improvement before stopping
    val_fraction: float = 0.15  # of the training groups, held out for early stopping
    max_dim: int = 2048  # wider inputs (e.g. pool=tokens) are PCA-projected to this many dims (0: never)
    seed: int = 0


PROTOCOLS = {
    "fast": FitConfig(),
    "sie": FitConfig(
        hidden=1024,
        epochs=50,
        weight_decay=0.0,
        optimizer="adam",
        standardise=False,
        early_stop=False,
        max_dim=0,
    ),
}


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def group_split(groups: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask of rows whose group (source photo) falls in a random `fraction` of the groups."""
    ids = groups.unique()
    n_out = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    held = ids[torch.randperm(len(ids), generator=gen)[:n_out]]
    return torch.isin(groups, held)


def _project(x_train: torch.Tensor, x_test: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both onto the top `dim` principal components of x_train (a no-op when already narrow)."""
    mean = x_train.mean(0)
    _, _, v = torch.pca_lowrank(x_train - mean, q=dim, center=False, niter=3)  # v (D, dim)
    return (x_train - mean) @ v, (x_test - mean) @ v


def fit_predict(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    loss_fn,
    cfg: FitConfig,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Train `model` on (x, y), early-stopped on held-out groups when cfg.early_stop; -> predictions
    on x_test. The best trained epoch (at least one) by validation loss predicts."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.early_stop:
        is_val = group_split(groups.cpu(), cfg.val_fraction, gen).to(x.device)
    else:
        is_val = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    x_fit, y_fit, x_val, y_val = x[~is_val], y[~is_val], x[is_val], y[is_val]
    model = model.to(x.device)
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def val_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x_val), y_val))

    # The untrained head (epoch 0) is never a candidate: with a zero last layer it predicts the mean,
    # and a noisy validation split could otherwise keep it (R² ≡ 0, whatever the features hold).
    best, best_state, stale = float("inf"), None, 0
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x_fit), generator=gen).to(x.device).split(cfg.batch_size):
            loss = loss_fn(model(x_fit[idx]), y_fit[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not cfg.early_stop:
            continue
        model.eval()
        current = val_loss()
        if current < best - 1e-6:
            best, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        return model(x_test)


def regress_r2(
    f1: torch.Tensor,
    f2: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    fit: FitConfig | None = None,
    test_fraction: float = 0.25,
) -> dict:
    """R² of targets y regressed from [f1, f2] by the MLP, on pairs of held-out groups.

    f1, f2: (N, D) embeddings of x and x'; y: (N, q) targets; groups: (N,) the source photo of each
    pair. -> {"r2", "r2_sie", "n_train", "n_test"}.
    """
    fit = fit or FitConfig()
    if len(groups.unique()) < 3:
        raise ProbeError(
            f"the equivariance probe needs pairs from at least 3 source photos, got {len(groups.unique())}"
        )
    gen = torch.Generator().manual_seed(fit.seed + 1)
    is_test = group_split(groups.cpu(), test_fraction, gen).to(f1.device)
    x = torch.cat([f1, f2], dim=1).float()  # (N, 2D)
    y = y.float().to(f1.device)
    x_tr, x_te = x[~is_test], x[is_test]
    if fit.standardise:
        x_tr, x_te = _standardise(x_tr, x_te)
    if fit.max_dim and x_tr.shape[1] > fit.max_dim:
        # One scale for all components: standardising each would blow up the near-empty trailing
        # components, whose values on unseen photos are not small (measured: R² -3 on pixels).
        x_tr, x_te = _project(x_tr, x_te, fit.max_dim)
        scale = x_tr.std(0).mean().clamp_min(1e-6)
        x_tr, x_te = x_tr / scale, x_te / scale
    y_tr = y[~is_test]
    mean, std = y_tr.mean(0), y_tr.std(0).clamp_min(1e-6)
    if fit.standardise:
        y_tr = (y_tr - mean) / std
    torch.manual_seed(fit.seed)
    head = mlp(x_tr.shape[1], y.shape[1], fit.hidden, zero_last=fit.standardise)
    pred = fit_predict(head, x_tr, y_tr, x_te, F.mse_loss, fit, groups[~is_test.cpu()])
    if fit.standardise:  # back to target units (affine per dimension: r2 unchanged, r2_sie not)
        pred = pred * std + mean
    y_test = y[is_test]
    return {
        "r2": r2_per_dim(pred.cpu(), y_test.cpu()),
        "r2_sie": r2_global(pred.cpu(), y_test.cpu()),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
    }


def over_seeds(
    f1: torch.Tensor,
    f2: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    fit: FitConfig,
    seeds: tuple[int, ...],
    test_fraction: float = 0.25,
) -> dict:
    """regress_r2 once per probe seed -> {"r2", "r2_std", "r2_sie", "r2_sie_std", "r2_seeds",
    "n_train", "n_test"} (mean and std over seeds; n_* of the first seed, the split varies)."""
    runs = [regress_r2(f1, f2, y, groups, replace(fit, seed=s), test_fraction) for s in seeds]
    r2 = torch.tensor([r["r2"] for r in runs], dtype=torch.float64)
    sie = torch.tensor([r["r2_sie"] for r in runs], dtype=torch.float64)
    std = lambda t: float(t.std()) if len(t) > 1 else 0.0
    return {
        "r2": float(r2.mean()),
        "r2_std": std(r2),
        "r2_sie": float(sie.mean()),
        "r2_sie_std": std(sie),
        "r2_seeds": [round(float(v), 6) for v in r2],
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
    }


def linear_top1(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    fit: FitConfig | None = None,
) -> float:
    """Top-1 accuracy of softmax regression fitted on standardised train features, scored on val."""
    fit = fit or FitConfig(epochs=100, batch_size=1024, lr=1e-3, weight_decay=1e-4, patience=10)
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    x_tr, x_va = _standardise(f_train.float(), f_val.float())
    head = nn.Linear(x_tr.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    # Early stopping needs held-out rows; single samples are their own groups here.
    groups = torch.arange(len(x_tr))
    pred = fit_predict(head, x_tr, y_train.to(x_tr.device), x_va, F.cross_entropy, fit, groups)
    return float((pred.argmax(1).cpu() == y_val.cpu()).float().mean())


def knn_top1(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train = F.normalize(f_train.float(), dim=1)
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(f_val), chunk):
        val = F.normalize(f_val[start : start + chunk].float(), dim=1)
        sim, idx = (val @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(val), n_classes, device=val.device)
        votes.scatter_add_(1, y_train.to(val.device)[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1).cpu() == y_val[start : start + chunk].cpu()).sum())
    return correct / len(f_val)
