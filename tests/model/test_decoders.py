"""Decoders: patch layout, output shapes, the conv stage count, K folding, and loss = MSE of predictions."""

from __future__ import annotations

import pytest
import torch
from model_testing import tiny_config
from torch import nn

from kernels import recon_loss_ref
from model.decoders import ConvDecoder, HyperPredictor, build_decoder, patchify, unpatchify

D_EQ, GRID = 64, 4


def _decoder(name: str, target_size: int, steps: int, *overrides: str) -> nn.Module:
    cfg = tiny_config("demo", *overrides)
    return build_decoder(name, D_EQ, GRID, target_size, steps, cfg.model)


def test_patchify_layout_and_inverse():
    images = torch.randn(2, 3, 3, 16, 16)  # (B, K, 3, H, W), 4×4 grid of 4-pixel patches
    patches = patchify(images, GRID)
    assert patches.shape == (2, 3, 16, 4 * 4 * 3)
    # patch (row 1, col 2) holds pixels [4:8, 8:12] in (row, col, channel) order
    expected = images[1, 2, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[1, 2, 1 * GRID + 2], expected)
    torch.testing.assert_close(unpatchify(patches, GRID), images)


@pytest.mark.parametrize("name, steps", [("conv", 2), ("xattn", 1), ("xattn-path", 3)])
@pytest.mark.parametrize("target_size", [32, 16])
def test_output_shapes(name, steps, target_size):
    dec = _decoder(name, target_size, steps)
    z1, z2 = torch.randn(2, GRID * GRID, D_EQ), torch.randn(2, GRID * GRID, D_EQ)
    p_t = target_size // GRID
    assert dec(z1, z2).shape == (2, steps, GRID * GRID, p_t * p_t * 3)
    assert dec.predict(z1, z2).shape == (2, steps, 3, target_size, target_size)


@pytest.mark.parametrize("target_size, n_up, n_conv", [(4, 0, 4), (16, 2, 4), (64, 4, 4), (128, 5, 5)])
def test_conv_stages_follow_grid_and_target(target_size, n_up, n_conv):
    dec = ConvDecoder(D_EQ, width=64, grid=GRID, target_size=target_size, steps=2)
    assert len(dec.branches) == 2
    layers = list(dec.branches[0].convs)
    assert sum(isinstance(m, nn.Upsample) for m in layers) == n_up
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_conv and convs[-1].out_channels == 3
    assert convs[0].in_channels == 64


@pytest.mark.parametrize("name, steps", [("conv", 2), ("xattn", 1), ("xattn-path", 2)])
def test_prediction_depends_on_both_views(name, steps):
    dec = _decoder(name, 32, steps)
    z1, z2 = torch.randn(2, GRID * GRID, D_EQ), torch.randn(2, GRID * GRID, D_EQ)
    with torch.no_grad():
        base = dec(z1, z2)
        assert not torch.allclose(dec(z1 + 1, z2), base)
        assert not torch.allclose(dec(z1, z2 + 1), base)


def test_xattn_path_steps_do_not_mix():
    """Folding K into the query length and then into the batch must keep the steps apart: step k's
    output depends on its own step embedding only."""
    dec = _decoder("xattn-path", 32, 3).eval()
    z1, z2 = torch.randn(2, GRID * GRID, D_EQ), torch.randn(2, GRID * GRID, D_EQ)
    with torch.no_grad():
        full = dec(z1, z2)
        assert not torch.allclose(full[:, 0], full[:, 1])
        dec.step_embed[:] = dec.step_embed[1].clone()  # every step now looks like step 1
        same = dec(z1, z2)
    for k in range(3):
        torch.testing.assert_close(same[:, k], full[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("name, steps", [("conv", 2), ("xattn", 1), ("xattn-path", 2)])
def test_loss_is_the_mse_of_the_predictions(name, steps, norm_pix):
    dec = _decoder(name, 16, steps)
    z1, z2 = torch.randn(2, GRID * GRID, D_EQ), torch.randn(2, GRID * GRID, D_EQ)
    targets = torch.randn(2, steps, 3, 16, 16)
    expected = recon_loss_ref(dec(z1, z2), patchify(targets, GRID), norm_pix)
    torch.testing.assert_close(dec.loss(z1, z2, targets, norm_pix), expected)


def test_sie_predictor_is_bias_free_linear():
    pred = HyperPredictor(t_dim=13, d=16)
    assert sum(p.numel() for p in pred.parameters()) == 13 * 16 * 16  # no bias anywhere
    z, t_a, t_b = torch.randn(4, 16), torch.randn(4, 13), torch.randn(4, 13)
    with torch.no_grad():
        torch.testing.assert_close(pred(2 * z, t_a), 2 * pred(z, t_a))  # linear in z
        torch.testing.assert_close(pred(z, 3 * t_a), 3 * pred(z, t_a))  # linear in the code
        assert not torch.allclose(pred(z, t_a), pred(z, t_b))
