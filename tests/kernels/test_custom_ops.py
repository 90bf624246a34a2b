"""The Triton paths as torch.library custom ops: torch.library.opcheck (schema, autograd registration,
fake tensors, AOTAutograd with dynamic shapes, each against the op run eagerly) on small odd shapes,
and a traced graph that keeps every kernel as one node with no graph break.

The ops run under TRITON_INTERPRET=1 here (the `interpreted_kernels` fixture): opcheck calls the real
kernels through the interpreter, fast enough at these sizes.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.cross_attention import _xattn_backward_op, _xattn_op
from kernels.recon_loss import _recon_linear_op, _recon_op

OK = {n: "SUCCESS" for n in ("test_schema", "test_autograd_registration", "test_faketensor")}


def _opcheck(op, args) -> None:
    result = torch.library.opcheck(op, args)
    assert result == {**OK, "test_aot_dispatch_dynamic": "SUCCESS"}, result


def _randn(*shape, dtype=torch.float32, grad=False, seed=0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_(grad)


@pytest.mark.parametrize(
    "b, h, n_q, n_k, d, dtype",
    [(1, 3, 5, 7, 32, torch.float32), (2, 1, 1, 9, 64, torch.float16)],
    ids=["Nq5-Nk7-fp32", "Nq1-Nk9-fp16"],
)
def test_cross_attention_op_passes_opcheck(interpreted_kernels, b, h, n_q, n_k, d, dtype):
    q = _randn(b, h, n_q, d, dtype=dtype, grad=True)
    k, v = (
        _randn(b, h, n_k, d, dtype=dtype, grad=True, seed=1),
        _randn(b, h, n_k, d, dtype=dtype, grad=True, seed=2),
    )
    _opcheck(_xattn_op, (q, k, v, 0.3))


@pytest.mark.parametrize("need_dkdv", [True, False])
def test_cross_attention_backward_op_passes_opcheck(interpreted_kernels, need_dkdv):
    q, k, v = _randn(1, 2, 5, 32), _randn(1, 2, 3, 32, seed=1), _randn(1, 2, 3, 32, seed=2)
    out, lse = _xattn_op(q, k, v, 0.2)
    _opcheck(_xattn_backward_op, (q, k, v, out, lse, _randn(1, 2, 5, 32, seed=3), 0.2, need_dkdv))


@pytest.mark.parametrize(
    "images, norm_pix, need_grad",
    [(True, True, True), (False, False, True), (True, False, False)],
    ids=["images-norm_pix", "patches", "no-grad"],
)
def test_recon_loss_op_passes_opcheck(interpreted_kernels, images, norm_pix, need_grad):
    # (B, K, N, P) = (2, 3, 4, 12): a 2×2 grid of 2×2 patches of 3 channels, from (2, 3, 3, 4, 4) images
    pred = _randn(2, 3, 4, 12, grad=need_grad)
    target = _randn(2, 3, 3, 4, 4, seed=1) if images else _randn(2, 3, 4, 12, seed=1)
    _opcheck(_recon_op, (pred, target, norm_pix, need_grad))


@pytest.mark.parametrize(
    "needs, images",
    [((True, True, True), True), ((True, False, True), False), ((False, True, False), True)],
    ids=["all-images", "hidden-bias-patches", "weight-only-images"],
)
def test_recon_loss_linear_op_passes_opcheck(interpreted_kernels, needs, images):
    hidden = _randn(2, 3, 4, 5, grad=needs[0])  # C = 5 -> P = 12
    weight, bias = _randn(12, 5, grad=needs[1], seed=1), _randn(12, grad=needs[2], seed=2)
    target = _randn(2, 3, 3, 4, 4, seed=3) if images else _randn(2, 3, 4, 12, seed=3)
    _opcheck(_recon_linear_op, (hidden, weight, bias, target, images, *needs))


def _decoder_step(q, k, v, weight, bias, target):
    """Cross-attention, the fused pixel head + loss and the plain loss, as a decoder uses them."""
    out = kernels.cross_attention(q, k, v)  # (1, 2, 5, 32)
    hidden = out.transpose(1, 2).reshape(1, 1, 5, 64)  # (B, K, N, C)
    plain = kernels.recon_loss(hidden[..., :12] * 2, target)
    return kernels.recon_loss_linear(hidden, weight, bias, target, True) + plain


def test_a_traced_step_keeps_every_kernel_in_one_graph(interpreted_kernels):
    args = [
        _randn(1, 2, 5, 32, grad=True),
        _randn(1, 2, 7, 32, grad=True, seed=1),
        _randn(1, 2, 7, 32, grad=True, seed=2),
        _randn(12, 64, grad=True, seed=3),
        _randn(12, grad=True, seed=4),
        _randn(1, 1, 5, 12, seed=5),
    ]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_decoder_step)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("eqrecon.cross_attention", "eqrecon.recon_loss", "eqrecon.recon_loss_linear"):
        assert any(op in t for t in targets), (op, sorted(targets))
    # AOTAutograd (the forward and backward graphs torch.compile hands to inductor) gives the eager
    # loss and gradients: the backward op and the saved gradients run as in eager mode
    torch._dynamo.reset()
    compiled = torch.compile(_decoder_step, backend="aot_eager", fullgraph=True)
    leaves = args[:5]
    eager = _decoder_step(*args)
    traced = compiled(*args)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    for name, a, b in zip(
        ("q", "k", "v", "weight", "bias"),
        torch.autograd.grad(traced * 3, leaves),
        torch.autograd.grad(eager * 3, leaves),
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    torch._dynamo.reset()
