"""train/backbones.py: one loader for export folders, training checkpoints and any timm ViT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.errors import CheckpointError, ExportError, ProbeError
from train import checkpoint, export
from train.backbones import load_backbone


@pytest.fixture(scope="module")
def vit_tiny(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A randomly initialised timm classifier (head included) and its weights file: no download."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.integration
def test_export_folder_and_checkpoint_give_the_same_backbone(trained):
    ckpt, folder = trained
    a, b = load_backbone(folder), load_backbone(ckpt)
    enc = export.load_method(ckpt)[0].encoder
    cfg = checkpoint.read(ckpt)["config"]["data"]
    for bb in (a, b):
        assert (bb.pool, bb.num_prefix_tokens, bb.img_size, bb.d_inv) == ("avg", 1, 32, enc.d_inv)
        assert bb.mean == tuple(cfg["mean"]) and bb.std == tuple(cfg["std"])
        assert not bb.model.training and not bb.head.training
    assert "path, step 1" in a.name and str(folder) in a.name and str(ckpt) in b.name
    x = _x(32)
    with torch.no_grad():
        tokens = a.model.forward_features(x)  # (B, 1 + 16, D)
        pooled = a.pool_tokens(tokens)
        assert tokens.shape == (2, 17, enc.embed_dim)
        assert torch.equal(tokens, b.model.forward_features(x)) and torch.equal(pooled, a.model(x))
        assert (pooled - enc.forward_features(x)[:, 1:].mean(1)).abs().max() <= 1e-5
        assert (a.head(pooled)[:, : a.d_inv] - enc(x).z_inv).abs().max() <= 1e-5
        assert torch.equal(a.head.weight, b.head.weight)


def test_any_timm_vit_with_a_local_weights_file(vit_tiny, tmp_path):
    source, path = vit_tiny
    bb = load_backbone(f"timm:vit_tiny_patch16_224:{path}")
    assert (bb.head, bb.d_inv, bb.pool, bb.num_prefix_tokens, bb.img_size) == (None, None, "token", 1, 224)
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)  # the architecture's pretrained cfg
    x = _x(224, 1)
    with torch.no_grad():
        tokens = bb.model.forward_features(x)
        assert torch.equal(tokens, source.forward_features(x))  # every weight came from the file
        assert torch.equal(bb.pool_tokens(tokens), source.forward_head(tokens, pre_logits=True))
    # A torch checkpoint holding {"state_dict": ...} reads the same.
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    again = load_backbone(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}")
    assert torch.equal(again.model.pos_embed, source.pos_embed)
    assert "random init" in load_backbone("timm:vit_tiny_patch16_224").name


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["export", "checkpoint", "timm"])
def test_another_img_size_resamples_the_position_embedding(trained, kind):
    ckpt, folder = trained
    spec = {"export": folder, "checkpoint": ckpt, "timm": "timm:test_vit"}[kind]
    bb = load_backbone(spec, img_size=48)
    patch = bb.model.patch_embed.patch_size[0]
    assert bb.img_size == 48
    assert bb.model.forward_features(_x(48)).shape[1] == bb.num_prefix_tokens + (48 // patch) ** 2
    with pytest.raises(ExportError, match="img_size 30: must be a positive multiple of the patch size"):
        load_backbone(spec, img_size=30)


def test_bad_specs_are_one_line_errors(tmp_path):
    save_file(timm.create_model("test_vit").state_dict(), str(tmp_path / "small.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "garbage.pt").write_bytes(os.urandom(256))
    cases = [
        (f"{tmp_path}/nothing", ProbeError, "no such export folder or checkpoint"),
        ("timm:vit_nonexistent_patch3", ProbeError, "timm has no model 'vit_nonexistent_patch3'"),
        (f"timm:vit_tiny_patch16_224:{tmp_path}/none.pth", ProbeError, "no such weights file"),
        (f"timm:vit_tiny_patch16_224:{tmp_path}/garbage.safetensors", ProbeError, "unreadable weights file"),
        (f"timm:vit_tiny_patch16_224:{tmp_path}/small.safetensors", ProbeError, "holds another architecture"),
        ("timm:test_resnet", ProbeError, "not a timm Vision Transformer"),
        (str(tmp_path / "garbage.pt"), CheckpointError, "not a readable training checkpoint"),
        (str(tmp_path), ExportError, "not an export folder"),
    ]
    for spec, kind, words in cases:
        with pytest.raises(kind) as info:
            load_backbone(spec)
        assert words in str(info.value) and "\n" not in str(info.value), (spec, str(info.value))
