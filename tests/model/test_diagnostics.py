"""Diagnostics of the equivariant part: own- vs other-step reconstruction error, the backbone
gradient ratio, the reconstruction reduction and the xattn query mask."""

from __future__ import annotations

import pytest
import torch
from model_testing import make_batch, variant_config

from model import build_method
from model.diagnostics import diagnostics, difference_images, grad_ratio, recon_errors
from pipeline.errors import ConfigError


def _build(name: str, *overrides: str):
    cfg = variant_config(name, *overrides)
    torch.manual_seed(0)
    return cfg, build_method(cfg.model, cfg.data)


def test_recon_errors_own_equals_other_when_the_step_is_ignored():
    targets = torch.randn(4, 3, 3, 8, 8)
    same = torch.randn(4, 1, 3, 8, 8).expand(-1, 3, -1, -1, -1)  # one image for every k
    out = recon_errors(same, targets)
    assert out["diag/recon.own"] == pytest.approx(out["diag/recon.other"], rel=1e-6)
    exact = recon_errors(targets, targets)
    assert exact["diag/recon.own"] == 0.0 and exact["diag/recon.other"] > 1.0
    assert set(exact) == {
        "diag/recon.own",
        "diag/recon.other",
        "diag/recon.own.k1",
        "diag/recon.own.k2",
        "diag/recon.own.k3",
    }
    assert torch.equal(difference_images(targets, targets), torch.zeros_like(targets))


def test_a_path_decoder_that_ignores_k_scores_own_equal_other():
    cfg, method = _build("path-conv")
    branches = method.equivariant.decoder.branches
    branches[1].load_state_dict(branches[0].state_dict())  # both steps predict the same image
    out = diagnostics(method, make_batch(cfg))
    assert out["diag/recon.own"] == pytest.approx(out["diag/recon.other"], rel=1e-5)
    assert out["diag/grad.inv"] > 0 and out["diag/grad.eq"] > 0
    assert all(p.grad is None for p in method.parameters())  # nothing accumulated


def test_grad_ratio_scales_with_lambda_and_is_zero_for_vicreg():
    cfg, vicreg = _build("vicreg")
    assert grad_ratio(vicreg, make_batch(cfg))["diag/grad_ratio"] == 0.0
    ratios = []
    for lam in ("1.0", "2.0"):
        cfg, method = _build("path-conv", f"--model.lam={lam}")
        ratios.append(grad_ratio(method, make_batch(cfg))["diag/grad_ratio"])
    assert ratios[1] == pytest.approx(2 * ratios[0], rel=1e-4) and ratios[0] > 0


def test_recon_reduction_sum_is_per_image():
    cfg, mean = _build("path-conv")
    _, summed = _build("path-conv", "--model.recon_reduction=sum")
    batch = make_batch(cfg)
    t = cfg.data.out_target_size
    torch.testing.assert_close(summed(batch)["loss/eq"], mean(batch)["loss/eq"] * 3 * t * t)
    with pytest.raises(ConfigError, match="recon_reduction"):
        _build("path-conv", "--model.recon_reduction=max")


def test_xattn_mask_ratio_hides_view_2_from_the_queries():
    _, method = _build("xattn", "--model.mask_ratio=0.99")  # every one of the 16 query tokens
    dec = method.equivariant.decoder.eval()
    z1, z2 = torch.randn(2, 16, method.encoder.d_eq), torch.randn(2, 16, method.encoder.d_eq)
    with torch.no_grad():
        torch.testing.assert_close(dec(z1, z2), dec(z1, torch.randn_like(z2)))
        assert not torch.allclose(dec(z1, z2), dec(torch.randn_like(z1), z2))
    _, plain = _build("xattn")
    with torch.no_grad():
        assert not torch.allclose(
            plain.equivariant.decoder(z1, z2), plain.equivariant.decoder(z1, torch.randn_like(z2))
        )
    half = method.equivariant.decoder.__class__(8, 16, 1, 1, 4, 12, mask_ratio=0.5)
    e = torch.randn(3, 16, 16)
    assert ((half.mask_queries(e) == half.mask_token).all(-1).sum(1) == 8).all()


def _with_dino(variant: str):
    """The DINO family (global crops only) with `variant`'s equivariant part."""
    import dataclasses

    from model import build_method
    from model.config import DinoConfig

    cfg = variant_config(variant)
    torch.manual_seed(0)
    head = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    return cfg, build_method(dataclasses.replace(cfg.model, family="dino", dino=head), cfg.data)


@pytest.mark.parametrize("family", ["vicreg", "dino"])
@pytest.mark.parametrize("variant", ["path-conv", "path-xattn", "xattn", "sie"])
def test_the_loss_weight_is_read_from_method_lam(variant, family):
    """model.grad_ratio's controller sets method.lam between steps: the loss and the measured ratio
    must follow it, for every equivariant part and invariant objective."""
    cfg, method = _build(variant) if family == "vicreg" else _with_dino(variant)
    batch = make_batch(cfg)
    args = {"teacher_temp": (0.04, 0.04)} if family == "dino" else {}
    ratios = []
    for lam in (1.0, 3.0):
        method.lam = lam
        terms = diagnostics(method, batch, recon=False, **args)  # buffers restored: both see the same model
        assert not any(k.startswith("diag/recon") for k in terms)
        ratios.append(terms["diag/grad_ratio"])
    assert ratios[0] > 0 and ratios[1] == pytest.approx(3 * ratios[0], rel=1e-4)
    method.lam = 7.5
    out = method(batch, **args)
    assert float(out["loss"]) == pytest.approx(float(out["loss/inv"] + 7.5 * out["loss/eq"]), rel=1e-6)
    assert method.cfg.lam == 1.0  # the config (saved with the run) is not what moves
