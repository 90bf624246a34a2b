"""train/probe_ridge.py against scikit-learn: the same folds and grid through sklearn's Ridge give the
same out-of-fold R², in the primal (F ≤ n) and the dual (F > n) forms; the folds hold out whole groups;
a fit on a GPU gives the CPU fit (gpu-marked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

from pipeline.errors import ProbeError
from train import probe_ridge as R


def _data(n_groups: int, per_group: int, f: int, t: int, noise: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(n_groups).repeat_interleave(per_group)
    y = torch.randn(len(groups), t, generator=gen) * torch.linspace(1, 5, t)
    content = torch.randn(n_groups, f, generator=gen)[groups]  # the photo's own features
    x = content + y @ torch.randn(t, f, generator=gen) + noise * torch.randn(len(groups), f, generator=gen)
    return x.double(), y.double(), groups


def _oracle(x: np.ndarray, y: np.ndarray, fold: np.ndarray, grid) -> tuple[np.ndarray, list[int]]:
    """The nested CV written with scikit-learn's Ridge: inner folds = the other outer folds."""
    x = (x - x.mean(0)) / x.std(0, ddof=1)
    alphas = [a * x.shape[1] for a in grid]
    pred, chosen = np.empty_like(y), []
    for k in np.unique(fold):
        test = fold == k
        scale = y[~test].var(0, ddof=1)
        err = np.zeros(len(alphas))
        for j in np.unique(fold):
            if j == k:
                continue
            tr, te = ~(test | (fold == j)), fold == j
            for i, a in enumerate(alphas):
                p = Ridge(alpha=a, solver="svd").fit(x[tr], y[tr]).predict(x[te]).reshape(-1, y.shape[1])
                err[i] += (((p - y[te]) ** 2).sum(0) / scale).sum()
        best = int(np.argmin(err))
        chosen.append(best)
        fit = Ridge(alpha=alphas[best], solver="svd").fit(x[~test], y[~test])
        pred[test] = fit.predict(x[test]).reshape(-1, y.shape[1])
    return pred, chosen


@pytest.mark.parametrize("f", [6, 90])  # primal (F ≤ n) and dual (F > n)
def test_out_of_fold_predictions_match_sklearn_ridge(f):
    x, y, groups = _data(12, 5, f, 2, noise=3.0)
    fold = R.assign_folds(groups, 4, 1, seed=3)[0]
    solver = R._Solver(x, y, R.GRID)
    pred, chosen = R._out_of_fold(solver, fold, 4)
    want, want_chosen = _oracle(x.numpy(), y.numpy(), fold.numpy(), R.GRID)
    assert chosen == want_chosen
    # the dual form's Gram product is float32 (its cost dominates for pool=tokens): ~1e-5 relative
    np.testing.assert_allclose(
        pred.numpy(), want, rtol=1e-6 if f == 6 else 1e-4, atol=1e-8 if f == 6 else 1e-5
    )
    # ridge_cv's R² of that assignment is scikit-learn's r2_score of the pooled predictions
    out = R.ridge_cv(x, y, groups, folds=4, assignments=1, seed=3)
    assert out["r2"] == pytest.approx(r2_score(y.numpy(), want), abs=1e-6)
    assert out["alpha"] == [[R.GRID[b] for b in want_chosen]]


def test_folds_hold_out_whole_groups_and_test_every_group_once():
    _, _, groups = _data(13, 3, 2, 1, 0.0)
    folds = R.assign_folds(groups, 4, 5, seed=0)
    for fold in folds:
        for g in groups.unique():
            assert len(fold[groups == g].unique()) == 1  # one group, one fold
        sizes = torch.bincount(fold[::3], minlength=4)  # groups per fold, balanced like GroupKFold's
        assert sizes.max() - sizes.min() <= 1
    assert len({tuple(f.tolist()) for f in folds}) == 5  # assignments differ
    assert torch.equal(folds, R.assign_folds(groups, 4, 5, seed=0))  # and are reproducible
    # On GroupKFold's own folds the same rule holds: our solver reproduces sklearn on them too.
    x, y, groups = _data(8, 4, 5, 1, 1.0)
    fold = torch.empty(len(groups), dtype=torch.int64)
    for k, (_, test) in enumerate(GroupKFold(n_splits=4).split(x, y, groups)):
        fold[test] = k
    pred, _ = R._out_of_fold(R._Solver(x, y, R.GRID), fold, 4)
    np.testing.assert_allclose(
        pred.numpy(), _oracle(x.numpy(), y.numpy(), fold.numpy(), R.GRID)[0], atol=1e-8
    )


def test_r2_high_when_x_encodes_y_and_near_zero_when_it_does_not():
    x, y, groups = _data(20, 10, 32, 2, noise=0.3)
    good = R.ridge_cv(x, y, groups)
    assert good["r2"] > 0.9 and len(good["r2_assignments"]) == 4 and good["n"] == 200
    blind = R.ridge_cv(torch.randn(200, 32, generator=torch.Generator().manual_seed(1)), y, groups)
    assert abs(blind["r2"]) < 0.1, blind
    # photo identity does not leak: y constant per photo, x identifies the photo
    _, _, groups = _data(20, 10, 1, 1, 0.0)
    ident = torch.nn.functional.one_hot(groups).double() + 0.01 * torch.randn(200, 20, dtype=torch.float64)
    per_photo = torch.randn(20, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[groups]
    assert R.ridge_cv(ident, per_photo, groups)["r2"] < 0.1
    d = R.paired(good, blind)
    assert d["positive"] == d["of"] == 4 and d["diff"] == pytest.approx(good["r2"] - blind["r2"])


def test_too_few_groups_is_one_line():
    x, y, groups = _data(3, 4, 2, 1, 0.0)
    with pytest.raises(ProbeError, match="needs at least 4 source photos, got 3"):
        R.ridge_cv(x, y, groups)


def test_float32_features_get_the_same_fp64_fit_on_the_cpu():
    x, y, groups = _data(12, 5, 90, 2, noise=3.0)  # the dual form
    want = R.ridge_cv(x, y, groups, assignments=2)
    assert R.ridge_cv(x.float(), y, groups, assignments=2, device="cpu")["r2"] == pytest.approx(
        want["r2"], abs=1e-6
    )
    solver = R._Solver(x.to("cpu"), y, R.GRID)
    assert solver.gram().device.type == "cpu" and solver.gram().dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("f", [6, 90])  # primal and dual
def test_the_gpu_fit_matches_the_cpu_fit(f):
    """On a GPU the fit runs in fp64 there (the Gram too): the same α per fold and R² as on the CPU."""
    x, y, groups = _data(12, 5, f, 2, noise=3.0)
    cpu = R.ridge_cv(x, y, groups, assignments=2)
    gpu = R.ridge_cv(x.cuda(), y.cuda(), groups.cuda(), assignments=2, device="cuda")
    assert gpu["alpha"] == cpu["alpha"]
    assert gpu["r2_assignments"] == pytest.approx(cpu["r2_assignments"], abs=1e-5)
