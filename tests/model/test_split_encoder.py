"""SplitEncoder: shapes of the split, what the parts are made of, and that timm recreates the backbone."""

from __future__ import annotations

import pytest
import timm
import torch
from model_testing import tiny_config

from model import SplitEncoder


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_split_shapes(pool):
    cfg = tiny_config("demo", f"--model.pool={pool}")
    enc = SplitEncoder(cfg.model, cfg.data.img_size)
    out = enc(torch.randn(3, 3, 32, 32))
    n, d_inv = (32 // 8) ** 2, cfg.model.d_inv
    d_eq = cfg.model.d_patch - d_inv
    assert (enc.d_inv, enc.d_eq, enc.grid, enc.num_patches) == (d_inv, d_eq, 4, n)
    assert out.z_inv_tokens.shape == (3, n, d_inv)
    assert out.z_eq.shape == (3, n, d_eq)
    assert out.z_inv.shape == (3, d_inv)
    assert out.z_eq_pooled.shape == (3, d_eq)


def test_all_invariant_has_no_eq_channels():
    cfg = tiny_config("demo-vicreg")
    enc = SplitEncoder(cfg.model, cfg.data.img_size, all_invariant=True)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.z_inv.shape == (2, cfg.model.d_patch)
    assert out.z_eq.shape == (2, 16, 0)


def test_parts_are_the_head_channels_of_the_backbone_tokens():
    cfg = tiny_config("demo")
    enc = SplitEncoder(cfg.model, cfg.data.img_size).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.backbone.forward_features(x)
        out = enc(x)
        z = enc.head(tokens[:, enc.backbone.num_prefix_tokens :])  # (B, N, d_patch)
    torch.testing.assert_close(enc.forward_features(x), tokens)
    d_inv = cfg.model.d_inv
    torch.testing.assert_close(out.z_inv_tokens, z[..., :d_inv])
    torch.testing.assert_close(out.z_eq, z[..., d_inv:])
    torch.testing.assert_close(out.z_inv, z[..., :d_inv].mean(1))
    torch.testing.assert_close(out.z_eq_pooled, z[..., d_inv:].mean(1))


def test_cls_pool_uses_the_class_token():
    cfg = tiny_config("demo", "--model.pool=cls")
    enc = SplitEncoder(cfg.model, cfg.data.img_size).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        cls = enc.head(enc.forward_features(x)[:, 0])
    torch.testing.assert_close(out.z_inv, cls[:, : cfg.model.d_inv])


def test_timm_recreates_the_backbone_with_its_own_keys():
    cfg = tiny_config("demo")
    enc = SplitEncoder(cfg.model, cfg.data.img_size).eval()
    fresh = timm.create_model(enc.timm_name, pretrained=False, **enc.timm_kwargs).eval()
    fresh.load_state_dict(enc.backbone.state_dict(), strict=True)
    assert enc.timm_kwargs["depth"] == 2 and len(fresh.blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(x), enc.forward_features(x))
