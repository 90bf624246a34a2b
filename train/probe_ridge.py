"""The equivariance probe's default readout: closed-form ridge regression, cross-validated over source
photos, with the regularisation chosen by nested cross-validation on one fixed grid.

    out = ridge_cv(x, y, groups, folds=4, assignments=4)   # x (N, F), y (N, T), groups (N,)
    out["r2"], out["r2_std"], out["r2_assignments"]          # mean, std, one R² per fold assignment
    paired(out_backbone, out_random)                         # per-assignment differences, same folds

One fold assignment puts every source photo (group) in one of `folds` folds (a random permutation of
the photos, dealt round-robin), so every photo is tested exactly once and never sits on both sides of
a split. For each outer fold k the model is fitted on the other folds and predicts fold k; its α is
the grid value with the least inner-CV error, the inner folds being the remaining outer folds (the
same photos-held-out rule one level down). R² (scikit-learn's r2_score, uniform over the target's
dimensions) is scored once on the N pooled out-of-fold predictions. Repeating over `assignments`
random assignments (seeded: the same folds for every backbone given the same groups and seed) gives
the spread, and the differences between two backbones per assignment are paired.

Maths. Features are standardised once over all rows (label-free); each fit centres x and y on its
training rows (the unpenalised intercept) and solves

    w(α) = argmin ‖y_c - X_c w‖² + α‖w‖²,   α = a · F   for a in GRID  (F = feature count),

by one Cholesky solve per α and training set: of X_cᵀX_c + αI (F×F) when F ≤ n, from per-fold sums
computed once per assignment (a training set is a union of folds), else of the centred Gram matrix
X_cX_cᵀ + αI (n×n, the dual form, for pool=tokens), gathered from the Gram of all rows computed once.
The inner fits of a pair of folds (k, j) serve both outer folds k and j. α is relative to F because the standardised features' total variance is F
per row; one grid then suits any pooling.
"""

from __future__ import annotations

import torch

from pipeline.errors import ProbeError

GRID = tuple(10.0**k for k in range(-3, 5))  # a: α = a · F, 1e-3 .. 1e4


def assign_folds(groups: torch.Tensor, folds: int, assignments: int, seed: int = 0) -> torch.Tensor:
    """(N,) group ids -> (assignments, N) fold index of each row: groups permuted, dealt round-robin."""
    ids, inverse = torch.unique(groups.cpu(), return_inverse=True)
    out = torch.empty(assignments, len(groups), dtype=torch.int64)
    for a in range(assignments):
        gen = torch.Generator().manual_seed(seed * 1009 + a)
        fold_of_id = torch.empty(len(ids), dtype=torch.int64)
        fold_of_id[torch.randperm(len(ids), generator=gen)] = torch.arange(len(ids)) % folds
        out[a] = fold_of_id[inverse]
    return out


def _r2_columns(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-dimension R² (N, T), (N, T) -> (T,); a constant dimension scores 1 if exact, else 0."""
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).double())


class _Solver:
    """Ridge fits of standardised x (N, F) on y (N, T) for any α of the grid, a training set being a union
    of the folds of one assignment."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, alphas: tuple[float, ...]):
        x = x.double()
        self.x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)  # (N, F)
        self.y = y.double().reshape(len(y), -1)  # (N, T)
        self.alphas = [a * self.x.shape[1] for a in alphas]
        self._gram: torch.Tensor | None = None
        self._sums: tuple[torch.Tensor, list] | None = None  # (fold, per-fold sums) for the primal form

    def gram(self) -> torch.Tensor:
        """x xᵀ (N, N) of all rows, once: the costly step for pool=tokens. A float32 product on the CPU
        (fp64 after); fp64 throughout on a GPU, where it is cheap and no TF32 setting can reach it."""
        if self._gram is None:
            if self.x.device.type == "cpu":
                x32 = self.x.float()
                self._gram = (x32 @ x32.T).double()
            else:
                self._gram = self.x @ self.x.T
        return self._gram

    def fold_sums(self, fold: torch.Tensor) -> list:
        """Per fold k: XₖᵀXₖ (F, F), XₖᵀYₖ (F, T), Σx (F,), Σy (T,), rows; once per assignment, so that a
        primal fit on a union of folds costs additions, not a pass over the rows."""
        if self._sums is None or self._sums[0] is not fold:
            sums = []
            for k in range(int(fold.max()) + 1):
                xk, yk = self.x[fold == k], self.y[fold == k]
                sums.append((xk.T @ xk, xk.T @ yk, xk.sum(0), yk.sum(0), len(xk)))
            self._sums = (fold, sums)
        return self._sums[1]

    def predict(
        self, fold: torch.Tensor, train: list[int], test: list[int], which: list[int]
    ) -> torch.Tensor:
        """Fit on the rows of folds `train`, predict the rows of folds `test` (in row order) for the grid
        entries `which` -> (len(which), n_test, T).

        One Cholesky solve per α: of X_cᵀX_c + αI (F, F) when F ≤ n (primal, from the per-fold sums), else
        of the centred Gram X_cX_cᵀ + αI (n, n) (dual, gathered from the one N×N Gram of all rows)."""
        tr = torch.isin(fold, torch.tensor(train, device=fold.device)).nonzero().squeeze(1)  # (n,)
        te = torch.isin(fold, torch.tensor(test, device=fold.device)).nonzero().squeeze(1)  # (n_test,)
        n = len(tr)
        if self.x.shape[1] <= n:  # primal: centred scatter = Σ XₖᵀXₖ - n μμᵀ over the training folds
            sums = [self.fold_sums(fold)[k] for k in train]
            mean, y_mean = sum(s[2] for s in sums) / n, sum(s[3] for s in sums) / n  # (F,), (T,)
            a = sum(s[0] for s in sums) - n * torch.outer(mean, mean)  # (F, F)
            rhs = sum(s[1] for s in sums) - n * torch.outer(mean, y_mean)  # (F, T)
            apply = self.x[te] - mean  # (n_test, F)
        else:  # dual: X_c x_tᵀ by centring the Gram's entries on the training rows' mean
            g = self.gram()
            a, apply = g[tr[:, None], tr[None, :]], g[te[:, None], tr[None, :]]  # (n, n), (n_test, n)
            col, total = a.mean(0), a.mean()
            row = apply.mean(1, keepdim=True)
            a.sub_(col[None]).sub_(col[:, None]).add_(total)
            apply.sub_(col[None]).sub_(row).add_(total)
            y_mean = self.y[tr].mean(0)
            rhs = self.y[tr] - y_mean  # (n, T)
        out = []
        for i in which:
            shifted = a.clone()
            shifted.diagonal().add_(self.alphas[i])
            chol = torch.linalg.cholesky(shifted)
            out.append(apply @ torch.cholesky_solve(rhs, chol) + y_mean)
        return torch.stack(out)  # (len(which), n_test, T)


def _out_of_fold(solver: _Solver, fold: torch.Tensor, folds: int) -> tuple[torch.Tensor, list[int]]:
    """Nested CV over one fold assignment -> out-of-fold predictions (N, T) and the grid index chosen
    for each outer fold. The inner fit for (outer k, inner j) trains on every fold but k and j, the
    same set as (outer j, inner k): one fit per pair of folds serves both."""
    y, every = solver.y, list(range(len(solver.alphas)))
    scale = [y[fold != k].var(0).clamp_min(1e-12) for k in range(folds)]  # (T,): dimensions count equally
    inner_err = torch.zeros(folds, len(every), dtype=torch.float64, device=y.device)
    for k in range(folds):
        for j in range(k + 1, folds):
            rest = [i for i in range(folds) if i not in (k, j)]
            pair = (fold == k) | (fold == j)
            pred = solver.predict(fold, rest, [k, j], every)  # (A, n_pair, T), rows in order
            err = (pred - y[pair][None]) ** 2
            on_j, on_k = fold[pair] == j, fold[pair] == k
            inner_err[k] += (err[:, on_j].sum(1) / scale[k]).sum(1)
            inner_err[j] += (err[:, on_k].sum(1) / scale[j]).sum(1)
    pred = torch.empty_like(y)
    chosen = [int(torch.argmin(inner_err[k])) for k in range(folds)]
    for k in range(folds):
        rest = [i for i in range(folds) if i != k]
        pred[fold == k] = solver.predict(fold, rest, [k], [chosen[k]])[0]
    return pred, chosen


def ridge_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    folds: int = 4,
    assignments: int = 4,
    alphas: tuple[float, ...] = GRID,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Cross-validated ridge R² of y (N, T) from x (N, F), folds over `groups` (N,), fitted on `device`
    (a GPU's fp64 solves make thousands of pairs of token features cheap there) -> {
    "r2", "r2_std" (over assignments), "r2_assignments" (one per assignment: pair these), "r2_dims"
    (per target dimension, mean over assignments), "alpha" (the grid values a chosen, per assignment
    and outer fold), "n", "groups", "folds", "assignments"}."""
    if folds < 3:
        raise ProbeError(f"ridge readout: folds {folds}: need at least 3 (the inner CV uses folds - 1)")
    if assignments < 1:
        raise ProbeError("ridge readout: need at least one fold assignment")
    groups = torch.as_tensor(groups).reshape(-1)
    n_groups = len(torch.unique(groups))
    if n_groups < folds:
        raise ProbeError(
            f"the ridge readout's {folds}-fold cross-validation needs at least {folds} source photos, "
            f"got {n_groups}"
        )
    if not (len(x) == len(y) == len(groups)):
        raise ValueError(f"x, y, groups differ in length: {len(x)}, {len(y)}, {len(groups)}")
    solver = _Solver(x.to(device), y.to(device), alphas)
    r2, dims, chosen = [], [], []
    for fold in assign_folds(groups, folds, assignments, seed).to(device):
        pred, best = _out_of_fold(solver, fold, folds)
        per_dim = _r2_columns(pred, solver.y)
        r2.append(float(per_dim.mean()))
        dims.append(per_dim)
        chosen.append([alphas[b] for b in best])
    r2_t = torch.tensor(r2, dtype=torch.float64)
    return {
        "r2": float(r2_t.mean()),
        "r2_std": float(r2_t.std()) if len(r2) > 1 else 0.0,
        "r2_assignments": [round(v, 6) for v in r2],
        "r2_dims": [round(float(v), 6) for v in torch.stack(dims).mean(0)],
        "alpha": chosen,
        "n": len(x),
        "groups": n_groups,
        "folds": folds,
        "assignments": assignments,
    }


def paired(a: dict, b: dict) -> dict:
    """a minus b over the same fold assignments (or the MLP readout's probe seeds, "r2_seeds", which fix
    the held-out photos the same way) -> {"diff", "diff_std", "positive", "of"}."""
    key = "r2_assignments" if "r2_assignments" in a else "r2_seeds"
    da, db = a[key], b[key]
    if len(da) != len(db):
        raise ValueError(f"paired differences need the same assignments: {len(da)} vs {len(db)}")
    d = torch.tensor(da, dtype=torch.float64) - torch.tensor(db, dtype=torch.float64)
    return {
        "diff": float(d.mean()),
        "diff_std": float(d.std()) if len(d) > 1 else 0.0,
        "positive": int((d > 0).sum()),
        "of": len(d),
    }
