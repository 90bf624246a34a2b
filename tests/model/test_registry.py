"""A new equivariant part is one class plus one registry line (docs/DESIGN.md §1): a toy part defined
here, registered in model.EQUIVARIANT, trains two steps with every invariant objective, and nothing
else in the product has to know about it."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from model_testing import make_batch, variant_config
from torch import nn

import model
from model import build_method
from model.config import DinoConfig
from pipeline import masks as ibot_masks


class ToyMoments(nn.Module):
    """Predicts θ's rotation from the difference of the two views' pooled z_eq (a linear readout)."""

    uses_eq_channels = True

    def __init__(self, cfg, data, encoder, invariant=None):
        super().__init__()
        self.readout = nn.Linear(encoder.d_eq, 1)

    def forward(self, batch, o1, o2):
        pred = self.readout(o2.z_eq_pooled - o1.z_eq_pooled)[:, 0]  # (B,)
        loss = (pred - batch.theta[:, 0]).square().mean()
        return {"loss/eq": loss, "loss/eq.mse": loss.detach()}, None

    def reconstruct(self, batch, o1, o2):
        return None

    def targets(self, batch):
        return None


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(model.EQUIVARIANT, "toy", ToyMoments)  # the one registry line


@pytest.mark.parametrize("family", list(model.INVARIANT))
def test_a_toy_equivariant_part_trains_two_steps_with_every_objective(family, toy_registered):
    cfg = variant_config("path-conv")
    head = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    mcfg = dataclasses.replace(cfg.model, family=family, method="toy", dino=head)
    torch.manual_seed(0)
    method = build_method(mcfg, cfg.data)
    assert type(method.equivariant) is ToyMoments and method.encoder.d_eq > 0
    batch = make_batch(cfg, batch_size=4)
    args = {}
    if family != "vicreg":  # the DINO family reads local crops and (ibot, dinov2) iBOT's masks
        grid = method.encoder.grid
        masks = ibot_masks.block_masks(8, (grid, grid), random.Random(0), ranges=((0.2, 0.5),))
        local = torch.randn(4, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        batch = dataclasses.replace(batch, local=local, masks=masks.view(4, 2, -1))
        args = {"teacher_temp": (0.04, 0.04)}
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    readout = method.equivariant.readout.weight.detach().clone()
    backbone = method.encoder.backbone.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(2):
        out = method(batch, **args)
        assert {"loss", "loss/inv", "loss/eq", "loss/eq.mse"} <= out.keys()
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        # the toy's loss reaches the backbone through z_eq, and every trainable parameter has a gradient
        assert not [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.update_teacher(0.99)
    assert not torch.equal(method.equivariant.readout.weight, readout)
    assert not torch.equal(method.encoder.backbone.blocks[0].attn.qkv.weight, backbone)


def test_an_unregistered_part_is_one_line(toy_registered):
    cfg = variant_config("path-conv")
    with pytest.raises(
        Exception, match="unknown model.method 'toys'; choose from none, sie, xattn, path, toy"
    ):
        build_method(dataclasses.replace(cfg.model, method="toys"), cfg.data)
