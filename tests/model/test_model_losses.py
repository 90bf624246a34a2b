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


def test_sie_loss_and_predictor_match_the_official_code():
    """Against tests/model/sie_official.py (SIE.forward and ParametrizedNet transcribed): loss, every
    term and the gradients of every input and of the hypernetwork to 1e-6."""
    import sie_official as official

    from model.decoders import HyperPredictor

    torch.manual_seed(0)
    b, d_inv, d_eq, t_dim = 32, 24, 8, 13
    inputs = [torch.randn(b, d, dtype=torch.float64, requires_grad=True) for d in (d_inv, d_inv, d_eq, d_eq)]
    code = torch.randn(b, t_dim, dtype=torch.float64)
    ours_pred = HyperPredictor(t_dim, d_eq).double()
    args = official.default_args(b)
    theirs_pred = official.ParametrizedNet(d_eq, t_dim, args).double()
    theirs_pred.load_state_dict({"hypernet.net.0.weight": ours_pred.hypernet.weight.detach().clone()})

    x_inv, y_inv, x_eq, y_eq = inputs
    inv, eq, terms = sie_loss(x_inv, y_inv, x_eq, y_eq, ours_pred(x_eq, code))
    want, want_terms = official.sie_forward_loss(args, x_inv, y_inv, x_eq, y_eq, theirs_pred, code)
    torch.testing.assert_close(inv + eq, want, atol=1e-6, rtol=1e-6)
    for ours, theirs in (
        ("sim", "repr_loss_inv"),
        ("pred", "repr_loss_equi"),
        ("std", "std_loss"),
        ("pred_std", "pred_std_loss"),
        ("cov", "cov_loss"),
    ):
        torch.testing.assert_close(terms[ours].double(), want_terms[theirs].double(), atol=1e-6, rtol=1e-6)
    params_ours, params_theirs = [ours_pred.hypernet.weight], [theirs_pred.hypernet.net[0].weight]
    got = torch.autograd.grad(inv + eq, inputs + params_ours)
    expect = torch.autograd.grad(want, inputs + params_theirs)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert any(g.abs().sum() > 0 for g in got)  # the gradients are not trivially equal


def test_sie_loss_is_zero_pred_when_the_prediction_is_exact():
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    _, eq, terms = sie_loss(x, x, y, y, y, sim=2.0, std=3.0, cov=0.5, equi_factor=1.0)
    assert terms["pred"].item() == 0.0 and terms["sim"].item() == 0.0
    torch.testing.assert_close(eq, 3.0 * terms["pred_std"])
    torch.testing.assert_close(terms["std"], variance_term(torch.cat([x, y], 1)))


def _two_rank_worker(rank: int, world: int, init_file: str, full: dict, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = full["a"].shape[0] // world
        a = full["a"][rank * b : (rank + 1) * b].clone().requires_grad_()
        c = full["b"][rank * b : (rank + 1) * b].clone().requires_grad_()
        loss, terms = vicreg_loss(a, c)
        loss.backward()
        results[rank] = {
            "std": terms["std"].item(),
            "cov": terms["cov"].item(),
            "grad_a": a.grad,
            "grad_b": c.grad,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow
def test_vicreg_statistics_are_global_under_distributed(tmp_path):
    """Two Gloo ranks with half the batch each: variance/covariance equal the full batch's, and each
    rank's gradient is W × the full-batch loss's gradient for its slice (DDP then divides by W)."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(8, 6, generator=gen), "b": torch.randn(8, 6, generator=gen)}
    ref_a, ref_b = full["a"].clone().requires_grad_(), full["b"].clone().requires_grad_()
    ref_loss, ref_terms = vicreg_loss(ref_a, ref_b)
    ref_loss.backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), full, results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        r = results[rank]
        assert r["std"] == pytest.approx(ref_terms["std"].item(), rel=1e-5)
        assert r["cov"] == pytest.approx(ref_terms["cov"].item(), rel=1e-5)
        torch.testing.assert_close(r["grad_a"], 2 * ref_a.grad[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(r["grad_b"], 2 * ref_b.grad[rank * 4 : (rank + 1) * 4])
