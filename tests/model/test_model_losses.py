"""VICReg and SIE loss terms on inputs whose values are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import VAR_EPS, covariance_term, sie_loss, variance_term, vicreg_loss


def _whitened(b: int = 8) -> torch.Tensor:
    """(8, 4): columns of ±2 that are mutually orthogonal and zero-mean: std 2.14, no covariance."""
    h = torch.tensor([[1.0]])
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester Hadamard
    return 2 * h[:, 1:5]


def test_variance_term_hinges_on_unit_std():
    assert variance_term(_whitened()).item() == 0.0
    constant = torch.ones(8, 4)
    assert variance_term(constant).item() == pytest.approx(1 - math.sqrt(VAR_EPS))
    half = torch.cat([_whitened() / 8, _whitened()], 1)  # columns 0-3 have std 2·sqrt(8/7)/8 < 1
    std = 2 * math.sqrt(8 / 7) / 8
    assert variance_term(half).item() == pytest.approx((1 - math.sqrt(std**2 + VAR_EPS)) / 2, rel=1e-5)


def test_covariance_term_counts_off_diagonal_only():
    assert covariance_term(_whitened()).item() == pytest.approx(0.0, abs=1e-6)
    x = _whitened()[:, :1].repeat(1, 2)  # two identical columns, variance 4·8/7
    var = 4 * 8 / 7
    assert covariance_term(x).item() == pytest.approx(2 * var**2 / 2, rel=1e-5)


def test_vicreg_weights_and_terms():
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    loss, terms = vicreg_loss(a, b, sim=25.0, std=25.0, cov=1.0)
    assert set(terms) == {"sim", "std", "cov"}
    torch.testing.assert_close(terms["sim"], ((a - b) ** 2).mean())
    torch.testing.assert_close(terms["std"], (variance_term(a) + variance_term(b)) / 2)
    torch.testing.assert_close(loss, 25 * terms["sim"] + 25 * terms["std"] + terms["cov"])
    same, same_terms = vicreg_loss(_whitened(), _whitened())
    assert same.item() == pytest.approx(0.0, abs=1e-5) and same_terms["sim"].item() == 0.0


def test_vicreg_needs_two_samples():
    with pytest.raises(ValueError, match="B >= 2"):
        vicreg_loss(torch.randn(1, 8), torch.randn(1, 8))


def test_sie_loss_terms():
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    loss, terms = sie_loss(z2, z2, z1, sim=2.0, std=3.0, cov=0.5)
    assert terms["pred"].item() == 0.0
    torch.testing.assert_close(terms["std"], (variance_term(z1) + variance_term(z2)) / 2)
    torch.testing.assert_close(terms["cov"], covariance_term(z1) + covariance_term(z2))
    torch.testing.assert_close(loss, 3.0 * terms["std"] + 0.5 * terms["cov"])
    pred = z2 + 1
    _, terms = sie_loss(pred, z2, z1)
    assert terms["pred"].item() == pytest.approx(1.0)
