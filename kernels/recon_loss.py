"""Pixel-MSE reconstruction loss, fused: loss and d(loss)/d(pred) in one pass over pred and target.

recon_loss(pred, target, norm_pix) with pred (B, K, N, P) (any leading dims; P = patch pixels × 3)
and target either the same (B, K, N, P) patches or the images themselves (B, K, C, Ht, Wt), N = g²
patches of p×p on a g×g grid, P = p·p·C in (row, col, channel) order (MAE's) -> fp32 scalar
    L = mean over all B·K·N·P elements of (pred − t)²,   dL/dpred = 2 (pred − t) / numel,
    t = target, or with norm_pix t = (target − μ) / sqrt(σ² + 1e-6) per patch (μ, σ² over P).
σ² is the biased variance (divided by P, not P − 1): MAE uses the unbiased one, but the biased one is
what a one-pass kernel computes and is defined for P = 1; at P = 768 they differ by 0.07%.
Targets may be fp32, bf16 or fp16 (read and normalised in fp32 registers either way).

The kernel (kernels/_recon_triton.py) reads whole patches (rows of P, padded to a power of two),
from images through their strides when given images, so no patchified copy of the targets exists;
it normalises the target in registers, sums squares per program (added afterwards in a fixed order)
and writes the gradient in pred's dtype. Backward returns that stored gradient, scaled by
grad_output in place unless grad_output is 1 (reading that 0-dim value is one host sync per step).

recon_loss_linear(hidden, weight, bias, target, norm_pix) is the same loss of pred = hidden Wᵀ + b
(hidden (B, K, N, C), weight (P, C), bias (P,)) that never materialises pred: rows are processed in
chunks (as fused linear-cross-entropy kernels do), each chunk's pred is overwritten by its gradient
in place by the same kernel, which also sums the bias gradient; the gradients for hidden, weight and
bias are accumulated in the forward pass. The linear runs in hidden's dtype (as under autocast); the
weight gradient accumulates in fp32 (fp32 matmul outputs on CUDA), the bias gradient too.
Limits: P ≤ 16384 on the Triton path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import _backend

NORM_PIX_EPS = 1e-6
MAX_P = 16384
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton():
    from kernels import _recon_triton  # triton is imported here, on the Triton path only

    return _recon_triton


def image_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, K, C, H, W) -> (B, K, grid², p·p·C), p = H / grid: the patch layout of `recon_loss` (a copy)."""
    b, k, c, h, _ = images.shape
    p = h // grid
    x = images.reshape(b, k, c, grid, p, grid, p)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, k, grid * grid, p * p * c)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # (..., P) -> (R, P), contiguous (a copy only when the caller passed a strided view)
    return t.contiguous().view(-1, t.shape[-1])


def _image_geometry(pred: torch.Tensor, target: torch.Tensor, who: str) -> tuple[int, int, int] | None:
    """(K, grid, patch) when target is images (B, K, C, Ht, Wt) for pred (B, K, N, P); None for patches."""
    if target.dim() != 5 or pred.dim() != 4:
        return None
    (b, k, n, p), (bt, kt, c, h, w) = pred.shape, target.shape
    grid = math.isqrt(n)
    patch = h // grid if grid else 0
    if (b, k) != (bt, kt) or grid * grid != n or h != w or patch * grid != h or patch * patch * c != p:
        raise ValueError(
            f"{who}: target images {tuple(target.shape)} do not cut into the patches of pred {tuple(pred.shape)} "
            f"(want (B, K, C, g·p, g·p) with N = g² and P = p·p·C)"
        )
    return k, grid, patch


def _check_pair(pred: torch.Tensor, target: torch.Tensor, who: str = "recon_loss") -> None:
    if _image_geometry(pred, target, who) is None and pred.shape != target.shape:
        raise ValueError(f"{who}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 2 or pred.numel() == 0:
        raise ValueError(f"{who}: expected non-empty (B, K, N, P) tensors, got shape {tuple(pred.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{who}: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if pred.device != target.device:
        raise ValueError(f"{who}: pred on {pred.device} but target on {target.device}")


def _check_p(p: int, who: str) -> None:
    if p > MAX_P:
        raise ValueError(
            f"{who}: patch length P={p} exceeds the Triton kernel's {MAX_P}; set EQRECON_KERNELS=ref"
        )


def _check_linear(hidden, weight, bias, target) -> None:
    if hidden.dim() < 2 or weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"recon_loss_linear: want hidden (B, K, N, C), weight (P, C), bias (P,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    p, c = weight.shape
    fits = target.shape == (*hidden.shape[:-1], p)
    if hidden.dim() == 4 and target.dim() == 5:  # images: checked against the prediction's shape
        fits = _image_geometry(
            torch.empty((*hidden.shape[:-1], p), device="meta"), target, "recon_loss_linear"
        )
    if hidden.shape[-1] != c or bias.shape[0] != p or not fits:
        raise ValueError(
            f"recon_loss_linear: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, bias "
            f"{tuple(bias.shape)} and target {tuple(target.shape)} do not fit: hidden[..., C] @ weight(P, C)ᵀ "
            f"must give target[..., P]"
        )
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("target", target)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"recon_loss_linear: {name} has dtype {t.dtype}; use float16, bfloat16 or float32"
            )
        if t.device != hidden.device:
            raise ValueError(f"recon_loss_linear: {name} on {t.device} but hidden on {hidden.device}")
    if hidden.numel() == 0:
        raise ValueError(f"recon_loss_linear: empty hidden {tuple(hidden.shape)}")


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _target_rows(pred: torch.Tensor, target: torch.Tensor, who: str):
    """(target as the kernel reads it, image geometry or None): images stay images, patches become rows."""
    geometry = _image_geometry(pred, target, who)
    return (target, geometry) if geometry is not None else (_as_rows(target), None)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    # in place (a second backward through the same graph then fails autograd's version check);
    # skipped when grad_output is 1, the usual `loss.backward()`, which saves a pass over grad
    if bool(grad_loss == 1):
        return grad
    return grad.mul_(grad_loss.to(grad.dtype))


def _add_fp32_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with an fp32 product (CUDA's fp32-output matmul for 16-bit a, b)."""
    if acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        acc += torch.mm(a, b, out_dtype=torch.float32)  # fp32 accumulation inside the GEMM too
    else:
        acc.addmm_(a.float(), b.float())


def _traced(t: torch.Tensor) -> bool:
    """True while `t` is being traced (torch.compile, AOTAutograd, export): a fake or functional
    tensor, or any tracing mode active; then its value cannot be read on the host."""
    modes = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE)
    return (
        torch.compiler.is_compiling()
        or type(t) is not torch.Tensor
        or any(torch._C._get_dispatch_mode(m) is not None for m in modes)
    )


def _scale_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """`_scaled` when running; while traced a plain product (reading grad_loss on the host is not
    traceable; inductor fuses the product into the backward graph instead)."""
    if _traced(grad_loss):
        return grad * grad_loss.to(grad.dtype)
    return _scaled(grad, grad_loss)


# Each fused loss is a torch.library custom op that returns the loss and the gradients it computed in
# the same pass (empty (0,) tensors for those not needed: an op returns tensors), with a fake that
# gives their shapes and an autograd formula that hands the saved gradients back scaled by
# grad_output. torch.compile then keeps the kernel in its graph as one opaque node (dynamo cannot trace
# a Triton launcher, least of all the interpreter). Which gradients to compute is an argument, decided
# by the public function from requires_grad and grad mode (an op's body sees no autograd context).


@torch.library.custom_op("eqrecon::recon_loss", mutates_args=())
def _recon_op(
    pred: torch.Tensor, target: torch.Tensor, norm_pix: bool, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss fp32 0-dim, dL/dpred shaped like pred, or (0,) without need_grad)."""
    pred2 = _as_rows(pred)
    target2, geometry = _target_rows(pred, target, "recon_loss")
    grad = torch.empty_like(pred2) if need_grad else None
    total, _ = _triton().sum_sq_and_grad(
        pred2, target2, geometry, grad, norm_pix, NORM_PIX_EPS, 2.0 / pred.numel()
    )
    return total / pred.numel(), grad.view(pred.shape) if need_grad else pred.new_empty(0)


@_recon_op.register_fake
def _(pred, target, norm_pix, need_grad):
    loss = pred.new_empty((), dtype=torch.float32)
    return loss, torch.empty_like(
        pred, memory_format=torch.contiguous_format
    ) if need_grad else pred.new_empty(0)


def _recon_setup(ctx, inputs, output) -> None:
    ctx.need_grad = inputs[3]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _recon_backward(ctx, grad_loss, _dgrad):
    (grad,) = ctx.saved_tensors
    return (_scale_grad(grad, grad_loss) if ctx.need_grad else None), None, None, None


_recon_op.register_autograd(_recon_backward, setup_context=_recon_setup)


@torch.library.custom_op("eqrecon::recon_loss_linear", mutates_args=())
def _recon_linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    norm_pix: bool,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss fp32 0-dim, dL/dhidden like hidden, dL/dweight (P, C) fp32, dL/dbias (P,) fp32), each
    gradient (0,) when not needed."""
    p, c = weight.shape
    h2 = _as_rows(hidden)  # (R, C)
    r = h2.shape[0]
    pred_shape = (*hidden.shape[:-1], p)
    geometry = _image_geometry(torch.empty(pred_shape, device="meta"), target, "recon_loss_linear")
    # images as (B·K, C, Ht, Wt) (a view when contiguous), or the patches as (R, P) rows
    t2 = target.flatten(0, 1) if geometry is not None else _as_rows(target)
    w, b = weight.to(hidden.dtype), bias.to(hidden.dtype)
    numel = r * p
    grad_h = torch.empty_like(h2) if need_h else None
    grad_w = torch.zeros((p, c), device=hidden.device, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros((p,), device=hidden.device, dtype=torch.float32) if need_b else None
    write_grad = need_h or need_w or need_b
    # chunks of rows so that one chunk's pred is about the size of hidden (P/C chunks); with image
    # targets a chunk is whole (b, k) images, since the kernel addresses them by (b, k, patch)
    n_patches = pred_shape[-2] if geometry is not None else 1
    chunk = max(1, -(-r // max(1, -(-p // c))))
    chunk = -(-chunk // n_patches) * n_patches
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, r, chunk):
        hc = h2[start : start + chunk]
        pc = torch.addmm(b, hc, w.t())  # (rows, P) in hidden's dtype
        if geometry is not None:
            images = t2[start // n_patches : (start + hc.shape[0]) // n_patches]
            tc = images[None]  # (1, images in chunk, C, Ht, Wt): a view, K folded into the batch
            chunk_geometry = (images.shape[0], geometry[1], geometry[2])
        else:
            tc, chunk_geometry = t2[start : start + chunk], None
        part, bias_part = _triton().sum_sq_and_grad(
            pc,
            tc,
            chunk_geometry,
            pc if write_grad else None,
            norm_pix,
            NORM_PIX_EPS,
            2.0 / numel,
            bias_grad=need_b,
        )
        total += part
        # pc now holds dL/dpred for these rows
        if need_h:
            torch.mm(pc, w, out=grad_h[start : start + chunk])
        if need_w:
            _add_fp32_product(grad_w, pc.t(), hc)
        if need_b:
            grad_b += bias_part
    return (
        total / numel,
        grad_h.view(hidden.shape) if need_h else hidden.new_empty(0),
        grad_w if need_w else hidden.new_empty(0, dtype=torch.float32),
        grad_b if need_b else hidden.new_empty(0, dtype=torch.float32),
    )


@_recon_linear_op.register_fake
def _(hidden, weight, bias, target, norm_pix, need_h, need_w, need_b):
    p, c = weight.shape
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_h = (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else hidden.new_empty(0)
    )
    grad_w = hidden.new_empty((p, c) if need_w else (0,), dtype=torch.float32)
    grad_b = hidden.new_empty((p,) if need_b else (0,), dtype=torch.float32)
    return loss, grad_h, grad_w, grad_b


def _recon_linear_setup(ctx, inputs, output) -> None:
    _, weight, bias, _, _, need_h, need_w, need_b = inputs
    ctx.needs = (need_h, need_w, need_b)
    ctx.param_dtypes = (weight.dtype, bias.dtype)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _recon_linear_backward(ctx, grad_loss, *_grads_of_grads):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs
    w_dtype, b_dtype = ctx.param_dtypes
    grad_h = _scale_grad(grad_h, grad_loss) if need_h else None
    grad_w = (grad_w * grad_loss).to(w_dtype) if need_w else None
    grad_b = (grad_b * grad_loss).to(b_dtype) if need_b else None
    return grad_h, grad_w, grad_b, None, None, None, None, None


_recon_linear_op.register_autograd(_recon_linear_backward, setup_context=_recon_linear_setup)


def _needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _recon_triton(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """The fused kernel with its gradient (the Triton path of `recon_loss`)."""
    return _recon_op(pred, target, norm_pix, _needs_grad(pred))[0]


def _recon_linear_triton(hidden, weight, bias, target, norm_pix: bool = False) -> torch.Tensor:
    """The fused head + kernel with its gradients (the Triton path of `recon_loss_linear`)."""
    needs = (_needs_grad(hidden), _needs_grad(weight), _needs_grad(bias))
    return _recon_linear_op(hidden, weight, bias, target, norm_pix, *needs)[0]


# ---------------------------------------------------------------------------------------------
# Public functions and references
# ---------------------------------------------------------------------------------------------

_compiled_refs: dict = {}


def _compiled(fn):
    """torch.compile of a reference, made once (auto mode's third candidate on CUDA)."""
    if fn not in _compiled_refs:
        _compiled_refs[fn] = torch.compile(fn)
    return _compiled_refs[fn]


def _choose(op: str, triton_fn, ref, args: tuple, n_leaves: int) -> str:
    """'triton', 'ref' or 'compile' for this call (see `_backend.pick`); args = leaves + (target, norm_pix)."""
    tensors = args[: n_leaves + 1]
    key = (
        op,
        *(str(t.dtype).removeprefix("torch.") for t in tensors),
        "/".join("x".join(map(str, t.shape)) for t in tensors),
        "norm_pix" if args[-1] else "plain",
    )

    def candidates():
        leaves = [t.detach().clone().requires_grad_() for t in args[:n_leaves]]
        rest = args[n_leaves:]

        def fwd_bwd(fn):
            def run():
                with torch.enable_grad():
                    torch.autograd.grad(fn(*leaves, *rest), leaves)

            return run

        return {"triton": fwd_bwd(triton_fn), "ref": fwd_bwd(ref), "compile": fwd_bwd(_compiled(ref))}

    return _backend.pick(op, key, candidates, *tensors)


def recon_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error over all elements (fp32 scalar); the path per EQRECON_KERNELS.

    target: (B, K, N, P) patches like pred, or (B, K, C, Ht, Wt) images (read in place on the Triton path).
    """
    _check_pair(pred, target)
    args = (pred, target, bool(norm_pix))
    chosen = _choose("recon", _recon_triton, recon_loss_ref, args, 1)
    if chosen == "triton":
        _check_p(pred.shape[-1], "recon_loss")
        return _recon_triton(*args)
    return (_compiled(recon_loss_ref) if chosen == "compile" else recon_loss_ref)(*args)


def recon_loss_ref(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Plain PyTorch pixel MSE in fp32 (image targets are cut into patches first)."""
    if _image_geometry(pred, target, "recon_loss") is not None:
        target = image_patches(target, math.isqrt(pred.shape[2]))
    t = target.float()
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, unbiased=False, keepdim=True)
        t = (t - mean) / torch.sqrt(var + NORM_PIX_EPS)
    return (pred.float() - t).square().mean()


def recon_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    norm_pix: bool = False,
) -> torch.Tensor:
    """recon_loss(hidden @ weightᵀ + bias, target, norm_pix) without materialising the prediction."""
    _check_linear(hidden, weight, bias, target)
    args = (hidden, weight, bias, target, bool(norm_pix))
    chosen = _choose("recon_linear", _recon_linear_triton, recon_loss_linear_ref, args, 3)
    if chosen == "triton":
        _check_p(weight.shape[0], "recon_loss_linear")
        return _recon_linear_triton(*args)
    return (_compiled(recon_loss_linear_ref) if chosen == "compile" else recon_loss_linear_ref)(*args)


def recon_loss_linear_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    norm_pix: bool = False,
) -> torch.Tensor:
    """Plain PyTorch: the pixel head in hidden's dtype, then `recon_loss_ref`."""
    return recon_loss_ref(F.linear(hidden, weight.to(hidden.dtype), bias.to(hidden.dtype)), target, norm_pix)
