"""The probes: R² formulas, the MLP regressor on informative and uninformative features, linear and
k-NN top-1 on a separable toy set, the end-to-end equivariance probe on real photos with synthetic
backbones, and the results file schema."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import r2_score
from torch import nn

from train import probe

# A narrower head than the protocol's 1024 keeps each fit around a second on a shared 2-core CPU.
FAST = probe.FitConfig(hidden=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls on a CPU shared with other jobs run ~50x faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_r2_formulas_match_sklearn_and_sie():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(50, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0.0, 5.0, -1.0])
    pred = y + 0.3 * torch.randn(50, 3, generator=gen)
    assert probe.r2_per_dim(pred, y) == pytest.approx(r2_score(y.double().numpy(), pred.double().numpy()), abs=1e-9)
    sie = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert probe.r2_global(pred, y) == pytest.approx(float(sie), abs=1e-6)
    # The two differ when the dimensions have different scales: the global mean inflates SS_tot.
    assert probe.r2_global(pred, y) > probe.r2_per_dim(pred, y) + 0.05
    # 1-D: identical; a constant dimension predicted exactly scores 1 (scikit-learn's convention).
    assert probe.r2_per_dim(pred[:, :1], y[:, :1]) == pytest.approx(probe.r2_global(pred[:, :1], y[:, :1]))
    const = torch.ones(10, 1)
    assert probe.r2_per_dim(const, const) == 1.0


def _pairs(n_images: int, per_image: int, d: int, gen: torch.Generator):
    theta = torch.rand(n_images * per_image, 2, generator=gen) * 2 - 1
    groups = torch.arange(n_images).repeat_interleave(per_image)
    base = torch.randn(n_images, d, generator=gen)[groups]  # the source image's content
    return theta, groups, base


def test_regress_r2_near_one_when_features_encode_theta():
    gen = torch.Generator().manual_seed(1)
    theta, groups, base = _pairs(100, 6, 16, gen)
    mix = torch.randn(2, 16, generator=gen)
    f1, f2 = base, base + theta @ mix  # the pair's difference is a linear image of θ
    out = probe.regress_r2(f1, f2, theta, groups, fit=FAST)
    assert out["r2"] > 0.95 and out["r2_sie"] > 0.95, out
    assert out["n_train"] + out["n_test"] == len(theta)


def test_regress_r2_near_zero_when_features_ignore_theta():
    gen = torch.Generator().manual_seed(2)
    theta, groups, base = _pairs(100, 6, 16, gen)
    f1, f2 = base, base + 0.5 * torch.randn(base.shape, generator=gen)
    out = probe.regress_r2(f1, f2, theta, groups, fit=FAST)
    assert abs(out["r2"]) < 0.1 and abs(out["r2_sie"]) < 0.1, out


def test_regress_r2_splits_by_image():
    # Features identify the image, θ is one value per image: a pair-level split would let the MLP look
    # θ up from the image identity; the image-level split must not.
    gen = torch.Generator().manual_seed(3)
    theta, groups, base = _pairs(100, 6, 16, gen)
    per_image_theta = torch.rand(100, 2, generator=gen)[groups]
    out = probe.regress_r2(base, base, per_image_theta, groups, fit=FAST)
    assert out["r2"] < 0.3, out


def test_linear_and_knn_top1_on_separable_toy_set():
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 8, generator=gen) * 4

    def split(n):
        y = torch.arange(4).repeat(n // 4)
        return centres[y] + torch.randn(len(y), 8, generator=gen), y

    (f_tr, y_tr), (f_va, y_va) = split(200), split(80)
    assert probe.linear_top1(f_tr, y_tr, f_va, y_va) > 0.95
    assert probe.knn_top1(f_tr, y_tr, f_va, y_va) > 0.95
    noise = torch.randn(f_va.shape, generator=gen)
    assert probe.linear_top1(f_tr, y_tr, noise, y_va) < 0.6  # chance is 0.25
