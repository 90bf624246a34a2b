"""Triton cross-attention against cross_attention_ref: forward and dq, dk, dv, odd shapes, errors."""

from __future__ import annotations

import pytest
import torch
from kernel_parity import assert_parity, needs_cuda

import kernels
from kernels import _backend, cross_attention, cross_attention_ref, self_attention
from kernels.cross_attention import _cross_attention_triton


def _inputs(b, h, n_q, n_k, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (n_q, n_k, n_k))
    dout = torch.randn(b, h, n_q, d, generator=g).to(device, dtype)
    return q, k, v, dout


def _grads(fn, q, k, v, dout, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    out.backward(dout)
    return [out] + [t.grad for t in leaves]


def _check(q, k, v, dout, dtype, scale=None):
    got = _grads(cross_attention, q, k, v, dout, scale)
    exact = _grads(cross_attention_ref, q.double(), k.double(), v.double(), dout.double(), scale)
    lowp = _grads(cross_attention_ref, q, k, v, dout, scale)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, lowp):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, want {dtype}"
        assert_parity(name, a, e, t, dtype)


SHAPES = [  # (B, H, Nq, Nk, D): Nq ≠ Nk, ragged lengths, batch 1, every supported D
    (1, 3, 197, 50, 64),
    (1, 3, 197, 392, 64),
    (1, 3, 197, 50, 32),
    (2, 1, 1, 67, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_interpreter(interpreted_kernels, shape, dtype):
    _check(*_inputs(*shape, dtype), dtype)


def test_custom_scale_and_strided_inputs(interpreted_kernels):
    # q, k, v as the usual (B, N, H, D) -> (B, H, N, D) transposed views: read through their strides
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 33, 2, 32, generator=g).transpose(1, 2)
    kv = torch.randn(1, 70, 2, 2, 32, generator=g)  # (B, Nk, 2, H, D): k and v interleaved
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    dout = torch.randn(1, 2, 33, 32, generator=g)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, dout, torch.float32, scale=0.3)


def test_backward_without_key_grads(interpreted_kernels):
    q, k, v, dout = _inputs(1, 2, 20, 30, 32, torch.float32)
    q.requires_grad_()
    cross_attention(q, k, v).backward(dout)
    exact = q.detach().double().requires_grad_()
    cross_attention_ref(exact, k.double(), v.double()).backward(dout.double())
    lowp = q.detach().clone().requires_grad_()
    cross_attention_ref(lowp, k, v).backward(dout)
    assert_parity("dq", q.grad, exact.grad, lowp.grad, torch.float32)


def test_autocast_casts_mixed_inputs_like_sdpa(interpreted_kernels):
    q, k, v, _ = _inputs(1, 2, 9, 20, 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = cross_attention(q, k.half(), v)
    assert out.dtype == torch.float16
    exact = cross_attention_ref(*(t.half().double() for t in (q, k, v)))
    lowp = cross_attention_ref(q.half(), k.half(), v.half())
    assert_parity("autocast out", out, exact, lowp, torch.float16)


def test_triton_path_really_runs(interpreted_kernels):
    q, k, v, _ = _inputs(1, 1, 5, 7, 32, torch.float32)
    out = cross_attention(q.requires_grad_(), k, v)
    assert out.grad_fn is not None and "eqrecon_cross_attention" in type(out.grad_fn).__name__


@pytest.mark.parametrize(
    "shapes, dtype, match",
    [
        (((1, 2, 5, 48), (1, 2, 7, 48), (1, 2, 7, 48)), torch.float32, "head dim D=48"),
        (((1, 2, 5, 32), (1, 3, 7, 32), (1, 3, 7, 32)), torch.float32, "disagree on B, H or D"),
        (((1, 2, 5, 32), (1, 2, 7, 32), (1, 2, 8, 32)), torch.float32, "same shape"),
        (((2, 5, 32), (2, 7, 32), (2, 7, 32)), torch.float32, r"must be \(B, H, N, D\)"),
        (((1, 2, 5, 32), (1, 2, 7, 32), (1, 2, 7, 32)), torch.float64, "dtype torch.float64"),
        (((1, 2, 0, 32), (1, 2, 7, 32), (1, 2, 7, 32)), torch.float32, "empty"),
    ],
)
def test_bad_inputs_fail_clearly(interpreted_kernels, shapes, dtype, match):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in shapes)
    with pytest.raises((ValueError, TypeError), match=match):
        cross_attention(q, k, v)


def test_mixed_dtypes_fail_clearly():
    q = torch.zeros(1, 1, 4, 32)
    with pytest.raises(TypeError, match="dtypes differ"):
        cross_attention(q, q.half(), q.half())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
# vits16-xattn-path's decoder: the packed K·196 queries × 392 keys of the cross block, 196 × 196 self-attention;
# then odd shapes and the other head dims
@pytest.mark.parametrize(
    "shape",
    [
        (8, 3, 392, 392, 64),
        (16, 3, 196, 196, 64),
        (8, 3, 196, 392, 64),
        (4, 3, 197, 50, 128),
        (16, 6, 392, 196, 32),
        (3, 3, 1, 197, 64),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_parity_gpu(compiled_kernels, shape, dtype):
    _check(*_inputs(*shape, dtype, device="cuda"), dtype)


@pytest.mark.gpu
@needs_cuda
def test_backward_is_reproducible_gpu(compiled_kernels):
    # dK, dV accumulate in registers (bitwise reproducible); dQ sums key blocks with fp32 atomics, so
    # only its last bits may differ between runs: within the parity bound of each other
    q, k, v, dout = _inputs(4, 3, 196, 392, 64, torch.bfloat16, device="cuda")
    first = _grads(lambda *a: _cross_attention_triton(*a[:3], 0.125), q, k, v, dout)
    second = _grads(lambda *a: _cross_attention_triton(*a[:3], 0.125), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        if name == "dq":
            assert (a.float() - b.float()).abs().max().item() <= 2 * torch.finfo(
                torch.bfloat16
            ).eps * a.abs().max()
        else:
            assert torch.equal(a, b), name


@pytest.mark.gpu
@needs_cuda
def test_auto_mode_times_once_and_records_gpu(monkeypatch):
    monkeypatch.setenv("EQRECON_KERNELS", "auto")
    monkeypatch.setattr(_backend, "_choices", {})
    q, k, v, dout = _inputs(2, 3, 392, 392, 64, torch.bfloat16, device="cuda")
    got = _grads(cross_attention, q, k, v, dout)
    exact = _grads(cross_attention_ref, q.double(), k.double(), v.double(), dout.double())
    lowp = _grads(cross_attention_ref, q, k, v, dout)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, lowp):
        assert_parity(f"auto {name}", a, e, t, torch.bfloat16)
    (record,) = kernels.choices().values()
    assert record["chosen"] in record["ms"] and record["ms"]["triton"] is not None, record


@pytest.mark.parametrize("mode", ["auto", "ref"])
def test_self_attention_is_sdpa_or_the_reference(monkeypatch, mode):
    # the decoder's self-attention blocks: SDPA (the reference under ref), forward and gradients
    monkeypatch.setenv("EQRECON_KERNELS", mode)
    q, k, v, dout = _inputs(1, 3, 197, 197, 32, torch.float32)
    got = _grads(self_attention, q, k, v, dout)
    exact = _grads(cross_attention_ref, q.double(), k.double(), v.double(), dout.double())
    lowp = _grads(cross_attention_ref, q, k, v, dout)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, lowp):
        assert_parity(f"self {name}", a, e, t, torch.float32)
    assert ("ScaledDotProduct" in type(got[0].grad_fn).__name__) == (mode == "auto")
