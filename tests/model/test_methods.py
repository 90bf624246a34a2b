"""Methods: loss terms, reconstruction shapes, gradients reach every parameter, losses go down,
kernel switch invariance, and one-line errors for bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_testing import VARIANTS, make_batch, tiny_config, variant_config

from kernels import _backend
from model import build_method
from pipeline.errors import ConfigError


def _build(name: str, *overrides: str, seed: int = 0):
    cfg = variant_config(name, *overrides)
    torch.manual_seed(seed)
    return cfg, build_method(cfg.model, cfg.data)


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_terms(name):
    cfg, method = _build(name, "--model.lam=0.5")
    out = method(make_batch(cfg))
    assert {"loss", "loss/inv", "loss/eq", "loss/inv.sim", "loss/inv.std", "loss/inv.cov"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss/inv"] + 0.5 * out["loss/eq"])
    if name == "vicreg":
        assert out["loss/eq"].item() == 0.0
    else:
        assert out["loss/eq"].item() > 0.0
    if name == "sie":
        assert {"loss/eq.pred", "loss/eq.pred_std", "loss/inv.std", "loss/inv.cov"} <= set(out)


@pytest.mark.parametrize(
    "name, overrides, shape",
    [
        ("vicreg", (), None),
        ("sie", (), None),
        ("xattn", (), (8, 1, 3, 32, 32)),
        ("xattn", ("--data.target_size=16",), (8, 1, 3, 32, 32)),  # xattn reconstructs view 2 itself
        ("path-xattn", (), (8, 2, 3, 32, 32)),
        ("path-xattn", ("--data.target_size=16", "--data.aug.k=3"), (8, 3, 3, 16, 16)),
        ("path-conv", ("--data.target_size=64",), (8, 2, 3, 64, 64)),
        ("path-conv", ("--model.norm_pix=true",), (8, 2, 3, 32, 32)),
    ],
)
def test_reconstruct_shapes(name, overrides, shape):
    cfg, method = _build(name, *overrides)
    pred = method.reconstruct(make_batch(cfg))
    if shape is None:
        assert pred is None
    else:
        assert tuple(pred.shape) == shape and not pred.requires_grad and torch.isfinite(pred).all()


@pytest.mark.parametrize(
    "name, overrides", [(n, ()) for n in VARIANTS] + [("path-xattn", ("--model.pool=cls",))]
)
def test_every_parameter_gets_a_gradient(name, overrides):
    """An unused parameter breaks DDP (or silently never trains): each must get a non-zero gradient."""
    cfg, method = _build(name, *overrides)
    method(make_batch(cfg))["loss"].backward()
    dead = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_decreases_on_a_fixed_batch(name):
    cfg, method = _build(name)
    batch = make_batch(cfg)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(20):
        out = method(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"], [h["loss"] for h in history]
    if name != "vicreg":
        assert last["loss/eq"] < 0.9 * first["loss/eq"], [h["loss/eq"] for h in history]


# The variants whose decoder or reconstruction loss runs a kernel (vicreg and sie run none).
KERNEL_VARIANTS = [name for name in VARIANTS if name not in ("vicreg", "sie")]


@pytest.mark.parametrize("name", KERNEL_VARIANTS)
def test_weights_trained_on_the_triton_path_load_strictly_into_a_reference_build(
    name, monkeypatch, one_thread
):
    """One optimizer step through the Triton kernels (EQRECON_KERNELS=triton, interpreted on CPU), then
    the weights load strictly into a model built under ref, where they give the loss the Triton path
    gives: both paths share state_dict keys and semantics."""
    monkeypatch.setenv("EQRECON_KERNELS", "triton")
    cfg, trained = _build(name, seed=0)
    batch = make_batch(cfg)
    assert _backend.use_triton(batch.view1), "the Triton path would not run here"
    torch.manual_seed(0)
    trained(batch)["loss"].backward()
    torch.optim.SGD(trained.parameters(), lr=0.05).step()
    torch.manual_seed(1)  # the same mask draws (xattn's mask_ratio) for both forwards below
    with torch.no_grad():
        on_triton = trained(batch)["loss"]
    monkeypatch.setenv("EQRECON_KERNELS", "ref")
    _, other = _build(name, seed=1)  # other initial weights
    other.load_state_dict(trained.state_dict(), strict=True)
    torch.manual_seed(1)
    with torch.no_grad():
        on_ref = other(batch)["loss"]
    torch.testing.assert_close(on_ref, on_triton, rtol=1e-4, atol=1e-5)


def triton_vs_reference() -> None:
    """The same weights give the same loss and gradients through the Triton kernels as through the
    PyTorch references. Needs triton in interpreter mode (TRITON_INTERPRET=1 before importing it)."""
    assert _backend.triton_interprets(), "triton is not in interpreter mode"
    torch.set_num_threads(1)
    cfg, method = _build("path-xattn", "--model.expander=32", "--data.img_size=16", "--data.target_size=32")
    batch = make_batch(cfg, batch_size=2)
    results = {}
    for mode in ("ref", "triton"):
        os.environ["EQRECON_KERNELS"] = mode
        assert _backend.use_triton(batch.view1) == (mode == "triton")
        method.zero_grad(set_to_none=True)
        out = method(batch)
        out["loss"].backward()
        results[mode] = (out["loss/eq"].detach(), {n: p.grad.clone() for n, p in method.named_parameters()})
    (loss_ref, g_ref), (loss_tri, g_tri) = results["ref"], results["triton"]
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-4, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], rtol=1e-3, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.integration
@pytest.mark.slow
def test_path_method_matches_between_triton_and_reference():
    """Run in a fresh interpreter: triton fixes interpreter mode at its first import."""
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_methods; test_methods.triton_vs_reference()"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=here.parents[1],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_weight_decay_names():
    _, method = _build("path-xattn")
    names = method.no_weight_decay()
    assert {
        "encoder.backbone.pos_embed",
        "encoder.backbone.cls_token",
        "encoder.head.bias",
        "equivariant.decoder.step_embed",
        "equivariant.decoder.view_embed",
        "equivariant.decoder.norm.weight",
    } <= names
    assert "encoder.head.weight" not in names and "equivariant.decoder.head.weight" not in names


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("demo", ("--model.method=mae",), "unknown model.method 'mae'"),
        ("demo", ("--model.decoder=unet",), "model.decoder='unet' is not a path decoder"),
        ("demo", ("--model.decoder=xattn",), "model.decoder='xattn' is not a path decoder"),
        ("demo", ("--data.img_size=36",), "data.img_size=36 is not divisible by model.patch_size=8"),
        ("demo", ("--model.d_inv=128",), "model.d_inv=128 must be in"),
        ("demo-sie", ("--model.d_inv=0",), "model.d_inv=0 must be in"),
        (
            "demo-xattn-path",
            ("--model.dec_heads=5",),
            "model.dec_width=96 is not divisible by model.dec_heads=5",
        ),
        ("demo-xattn-path", ("--model.dec_heads=2",), "head dim model.dec_width / model.dec_heads = 48"),
        ("demo-xattn-path", ("--model.dec_depth=0",), "model.dec_depth must be >= 1"),
        ("demo", ("--data.aug.k=0",), "data.aug.k=0"),
        ("demo", ("--data.target_size=18",), "target size 18 is not divisible by the 4×4 token grid"),
        ("demo", ("--model.decoder=conv", "--data.target_size=24"), "is not a power of 2"),
        ("demo", ("--model.backbone=vit_nonexistent_patch16",), "model.backbone='vit_nonexistent_patch16'"),
        ("demo", ("--model.pool=max",), "unknown model.pool 'max'"),
        ("demo", ("--model.backbone=vit_medium_patch16_gap_256", "--model.pool=cls"), "has no class token"),
    ],
)
def test_bad_config_errors(preset, overrides, message):
    cfg = tiny_config(preset, *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        build_method(cfg.model, cfg.data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "field, shape, message",
    [
        ("view2", (8, 3, 16, 16), r"batch\.view2 has shape \(8, 3, 16, 16\)"),
        ("targets", (8, 3, 3, 32, 32), r"batch\.targets has shape \(8, 3, 3, 32, 32\)"),
    ],
)
def test_bad_batch_errors(field, shape, message):
    cfg, method = _build("path-xattn")
    batch = make_batch(cfg)
    setattr(batch, field, torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        method(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", VARIANTS)
def test_cuda_bf16_triton_matches_reference(name, monkeypatch):
    """On a GPU under bf16 autocast, the compiled kernels give the reference's losses (bf16 tolerance)
    and finite gradients for every parameter."""
    if _backend.triton_interprets():
        pytest.skip("triton is in interpreter mode (TRITON_INTERPRET=1); run the gpu tests without it")
    cfg, method = _build(name, "--data.img_size=64")
    method = method.cuda()
    batch = make_batch(cfg, batch_size=16).to("cuda")
    losses = {}
    for mode in ("ref", "triton"):
        monkeypatch.setenv("EQRECON_KERNELS", mode)
        method.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method(batch)
        out["loss"].backward()
        losses[mode] = out["loss/eq"].item(), out["loss"].item()
        assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
    assert losses["triton"] == pytest.approx(losses["ref"], rel=2e-2, abs=1e-3)


def test_sie_is_conditioned_on_g_and_on_the_crop_flip_difference():
    from pipeline.path import CROP1, CROP2, IDX

    cfg, method = _build("sie")
    batch = make_batch(cfg)
    code = method.equivariant.transformation_code(batch.theta)
    assert code.shape == (len(batch), 13)
    torch.testing.assert_close(code[:, 8:12], batch.theta[:, CROP2] - batch.theta[:, CROP1])
    torch.testing.assert_close(code[:, 12], batch.theta[:, IDX["flip2"]] - batch.theta[:, IDX["flip1"]])
    # the same views with a different crop relation: another prediction
    shifted = batch.theta.clone()
    shifted[:, CROP2] += 0.1
    x = torch.randn(len(batch), method.equivariant.predictor.d)
    with torch.no_grad():
        assert not torch.allclose(
            method.equivariant.predictor(x, code),
            method.equivariant.predictor(x, method.equivariant.transformation_code(shifted)),
        )
    assert all(
        p.bias is None for p in method.equivariant.predictor.modules() if isinstance(p, torch.nn.Linear)
    )
