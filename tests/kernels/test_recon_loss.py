"""Triton pixel-MSE loss and its fused-linear variant against the references: loss and every gradient."""

from __future__ import annotations

import pytest
import torch
from kernel_parity import assert_parity, needs_cuda

from kernels import image_patches, recon_loss, recon_loss_linear, recon_loss_linear_ref, recon_loss_ref

SHAPES = [(1, 1, 7, 45), (2, 2, 13, 768), (1, 2, 5, 1), (3, 1, 9, 147)]  # (B, K, N, P): odd N and P, K=1, 2
GRAD_OUT = 3.0  # backward through loss·3 checks that the stored gradient is scaled by grad_output


def _data(shape, dtype, device="cpu", seed=0, c=None):
    g = torch.Generator().manual_seed(seed)
    target = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    if c is None:
        return torch.randn(shape, generator=g).to(device, dtype), target
    hidden = torch.randn(*shape[:-1], c, generator=g).to(device, dtype)
    weight = (torch.randn(shape[-1], c, generator=g) / c**0.5).to(device, dtype)
    bias = (torch.randn(shape[-1], generator=g) * 0.1).to(device, dtype)
    return (hidden, weight, bias), target


def _loss_and_grads(fn, inputs, target, norm_pix):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, target, norm_pix)
    (loss * GRAD_OUT).backward()
    return [loss] + [t.grad for t in leaves]


def _check(fn, ref, inputs, target, norm_pix, dtype):
    got = _loss_and_grads(fn, inputs, target, norm_pix)
    exact = _loss_and_grads(ref, [t.double() for t in inputs], target.double(), norm_pix)
    lowp = _loss_and_grads(ref, inputs, target, norm_pix)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for i, (a, e, t) in enumerate(zip(got, exact, lowp)):
        if i > 0:
            assert a.dtype == inputs[i - 1].dtype, f"grad {i}: dtype {a.dtype}"
        assert_parity(f"{fn.__name__} output {i}", a, e, t, dtype)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["plain", "norm_pix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_recon_loss_parity(interpreted_kernels, shape, dtype, norm_pix):
    pred, target = _data(shape, dtype)
    _check(recon_loss, recon_loss_ref, [pred], target, norm_pix, dtype)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["plain", "norm_pix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_recon_loss_linear_parity(interpreted_kernels, shape, dtype, norm_pix):
    inputs, target = _data(shape, dtype, c=24)  # P/C > 1 for P=768: several row chunks
    _check(recon_loss_linear, recon_loss_linear_ref, list(inputs), target, norm_pix, dtype)


def test_strided_target_and_mixed_dtypes(interpreted_kernels):
    # fp16 prediction against an fp32 target given as a transposed view (B, N, K, P) -> (B, K, N, P)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 11, 2, 30, generator=g).transpose(1, 2)
    pred = torch.randn(2, 2, 11, 30, generator=g).half()
    assert not target.is_contiguous()
    got = _loss_and_grads(recon_loss, [pred], target, True)
    exact = _loss_and_grads(recon_loss_ref, [pred.double()], target.double(), True)
    lowp = _loss_and_grads(recon_loss_ref, [pred], target, True)
    for a, e, t in zip(got, exact, lowp):
        assert_parity("mixed", a, e, t, torch.float16)


def test_linear_with_fp32_params_and_fp16_hidden(interpreted_kernels):
    # what autocast hands the decoder: fp16 activations, fp32 parameters -> grads in each one's dtype
    (hidden, weight, bias), target = _data((1, 2, 9, 48), torch.float16, c=16)
    inputs = [hidden, weight.float(), bias.float()]
    got = _loss_and_grads(recon_loss_linear, inputs, target, False)
    exact = _loss_and_grads(recon_loss_linear_ref, [t.double() for t in inputs], target.double(), False)
    lowp = _loss_and_grads(recon_loss_linear_ref, inputs, target, False)
    assert [g.dtype for g in got[1:]] == [torch.float16, torch.float32, torch.float32]
    for a, e, t in zip(got, exact, lowp):
        assert_parity("autocast-like", a, e, t, torch.float16)


def test_no_grad_wanted_and_double_backward(interpreted_kernels):
    pred, target = _data((1, 1, 4, 8), torch.float32)
    assert torch.allclose(recon_loss(pred, target), recon_loss_ref(pred, target))  # pred needs no grad
    # grad_output 1 (plain loss.backward()): the stored gradient is returned as is, not rescaled in
    # place, so a second backward through the same graph gives the same gradient again
    leaf = pred.clone().requires_grad_()
    loss = recon_loss(leaf, target)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.grad, 2 * first)
    # any other grad_output scales the stored gradient in place: a second backward must then fail
    leaf = pred.clone().requires_grad_()
    loss = recon_loss(leaf, target) * 3
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


IMAGE_SHAPES = [(1, 2, 3, 3, 2), (2, 1, 3, 2, 3)]  # (B, K, C, grid, patch): odd grids, P = patch²·C


def _images(b, k, c, grid, patch, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, c, grid * patch, grid * patch, generator=g) * 2 + 0.5).to(dtype)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["plain", "norm_pix"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16], ids=["fp32_target", "bf16_target"])
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_image_targets_are_read_in_place(interpreted_kernels, shape, target_dtype, norm_pix):
    # targets given as images (B, K, C, Ht, Wt): the kernel reads patches through the image strides;
    # the result must equal the loss against the patchified copy, loss and gradient
    grid = shape[3]
    images = _images(*shape, target_dtype)
    patches = image_patches(images, grid)  # (B, K, grid², patch²·C)
    pred, _ = _data(tuple(patches.shape), torch.float32)
    got = _loss_and_grads(recon_loss, [pred], images, norm_pix)
    exact = _loss_and_grads(recon_loss_ref, [pred.double()], patches.double(), norm_pix)
    lowp = _loss_and_grads(recon_loss_ref, [pred], patches, norm_pix)
    for name, a, e, t in zip(("loss", "grad"), got, exact, lowp):
        assert_parity(f"images {name}", a, e, t, torch.float32)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["plain", "norm_pix"])
def test_linear_with_image_targets_in_several_chunks(interpreted_kernels, norm_pix):
    # P = 27 > C = 8: four row chunks, each whole (b, k) images; bias gradient summed in the kernel
    b, k, c, grid, patch = 2, 2, 3, 3, 3
    images = _images(b, k, c, grid, patch, torch.float32)
    patches = image_patches(images, grid)
    (hidden, weight, bias), _ = _data(tuple(patches.shape), torch.float32, c=8)
    inputs = [hidden, weight, bias]
    got = _loss_and_grads(recon_loss_linear, inputs, images, norm_pix)
    exact = _loss_and_grads(recon_loss_linear_ref, [t.double() for t in inputs], patches.double(), norm_pix)
    lowp = _loss_and_grads(recon_loss_linear_ref, inputs, patches, norm_pix)
    for name, a, e, t in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, exact, lowp):
        assert_parity(f"linear images {name}", a, e, t, torch.float32)


def test_bf16_targets_against_fp32_prediction(interpreted_kernels):
    pred, target = _data((1, 2, 5, 12), torch.float32)
    target = target.bfloat16()
    got = _loss_and_grads(recon_loss, [pred], target, True)
    exact = _loss_and_grads(recon_loss_ref, [pred.double()], target.double(), True)
    lowp = _loss_and_grads(recon_loss_ref, [pred], target, True)
    for a, e, t in zip(got, exact, lowp):
        assert_parity("bf16 target", a, e, t, torch.float32)


def test_image_targets_that_do_not_cut_into_patches_fail_clearly(interpreted_kernels):
    pred = torch.zeros(1, 1, 9, 12)  # 3×3 patches of 2×2×3
    with pytest.raises(ValueError, match=r"do not cut into the patches"):
        recon_loss(pred, torch.zeros(1, 1, 3, 7, 7))


@pytest.mark.parametrize(
    "pred_shape, target_shape, dtype, match",
    [
        ((2, 3, 4), (2, 3, 5), torch.float32, r"differ in shape"),
        ((5,), (5,), torch.float32, r"\(B, K, N, P\)"),
        ((2, 3), (2, 3), torch.int64, "dtype torch.int64"),
    ],
)
def test_bad_inputs_fail_clearly(interpreted_kernels, pred_shape, target_shape, dtype, match):
    with pytest.raises((ValueError, TypeError), match=match):
        recon_loss(torch.zeros(pred_shape, dtype=dtype), torch.zeros(target_shape, dtype=dtype))


def test_linear_bad_shapes_fail_clearly(interpreted_kernels):
    (hidden, weight, bias), target = _data((1, 1, 3, 10), torch.float32, c=8)
    with pytest.raises(ValueError, match="do not fit"):
        recon_loss_linear(hidden, weight.t().contiguous(), bias, target)
    with pytest.raises(ValueError, match=r"weight \(P, C\)"):
        recon_loss_linear(hidden, weight[0], bias, target)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("norm_pix", [False, True], ids=["plain", "norm_pix"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_parity_gpu(compiled_kernels, dtype, norm_pix):
    shape = (32, 2, 196, 768)
    pred, target = _data(shape, dtype, device="cuda")
    _check(recon_loss, recon_loss_ref, [pred], target, norm_pix, dtype)
    inputs, target = _data(shape, dtype, device="cuda", c=192)
    _check(recon_loss_linear, recon_loss_linear_ref, list(inputs), target, norm_pix, dtype)
