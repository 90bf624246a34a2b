"""Pixel-MSE reconstruction loss, fused: loss and d(loss)/d(pred) in one pass over pred and target.

recon_loss(pred, target, norm_pix) with pred and target (B, K, N, P) (any leading dims; P = patch
pixels × 3) -> fp32 scalar
    L = mean over all B·K·N·P elements of (pred − t)²,   dL/dpred = 2 (pred − t) / numel,
    t = target, or with norm_pix t = (target − μ) / sqrt(σ² + 1e-6) per patch (μ, σ² over P).
σ² is the biased variance (divided by P, not P − 1): MAE uses the unbiased one, but the biased one is
what a one-pass kernel computes and is defined for P = 1; at P = 768 they differ by 0.07%.

One program reads BLOCK_R whole patches (rows of P, padded to a power of two), normalises the
target in registers, writes its partial sum of squares (summed afterwards, deterministically) and
the gradient in pred's dtype; backward only scales that stored gradient by grad_output, in place.
No fp32 copies of pred or target are made; non-contiguous inputs are made contiguous first.

recon_loss_linear(hidden, weight, bias, target, norm_pix) is the same loss of pred = hidden Wᵀ + b
(hidden (B, K, N, C), weight (P, C), bias (P,)) that never materialises pred: rows are processed in
chunks (as fused linear-cross-entropy kernels do), each chunk's pred is overwritten by its gradient
in place by the same kernel, and the gradients for hidden, weight and bias are accumulated in the
forward pass. The linear runs in hidden's dtype (as under autocast); weight/bias grads accumulate
in fp32. Limits: P ≤ 16384 on the Triton path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _backend

NORM_PIX_EPS = 1e-6
MAX_P = 16384
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# Triton kernel (a plain function; `_backend.kernel_for` compiles or interprets it)
# ---------------------------------------------------------------------------------------------


def _recon_fwd(
    PRED, TARGET, GRAD, PARTIAL,
    R, P, inv_p, grad_scale, eps,
    NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_P)
    mask = (rows < R)[:, None] & (cols < P)[None, :]
    offs = rows.to(tl.int64)[:, None] * P + cols[None, :]  # (BLOCK_R, BLOCK_P), rows contiguous

    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, 1) * inv_p
        centred = tl.where(mask, t - mean[:, None], 0.0)
        var = tl.sum(centred * centred, 1) * inv_p  # biased: divided by P
        t = centred / tl.sqrt(var + eps)[:, None]
    x = tl.load(PRED + offs, mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, x - t, 0.0)
    tl.store(PARTIAL + pid, tl.sum(tl.sum(diff * diff, 1), 0))
    if WRITE_GRAD:
        # GRAD may alias PRED (recon_loss_linear): each element is read above before it is written
        tl.store(GRAD + offs, (diff * grad_scale).to(GRAD.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _blocks(p: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_P, num_warps): about 4096 elements per program, whole rows."""
    block_p = triton.next_power_of_2(p)
    block_r = max(1, min(64, 4096 // block_p))
    return block_r, block_p, 4 if block_r * block_p <= 4096 else 8


def _sum_sq_and_grad(pred2, target2, grad2, norm_pix: bool, grad_scale: float) -> torch.Tensor:
    """Σ(pred − t)² (fp32 0-dim) over (R, P) rows; writes grad_scale·(pred − t) into grad2 if given."""
    r, p = pred2.shape
    block_r, block_p, warps = _blocks(p)
    n_prog = triton.cdiv(r, block_r)
    partial = torch.empty(n_prog, device=pred2.device, dtype=torch.float32)
    kernel = _backend.kernel_for(_recon_fwd)
    with torch.cuda.device(pred2.device) if pred2.is_cuda else contextlib.nullcontext():
        kernel[(n_prog,)](
            pred2, target2, grad2 if grad2 is not None else pred2, partial,
            r, p, 1.0 / p, grad_scale, NORM_PIX_EPS,
            NORM_PIX=norm_pix, WRITE_GRAD=grad2 is not None, BLOCK_R=block_r, BLOCK_P=block_p,
            num_warps=warps,
        )  # fmt: skip
    return partial.sum()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # (..., P) -> (R, P), contiguous (a copy only when the caller passed a strided view)
    return t.contiguous().view(-1, t.shape[-1])


def _check_pair(pred: torch.Tensor, target: torch.Tensor, who: str = "recon_loss") -> None:
    if pred.shape != target.shape:
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
        raise ValueError(f"{who}: patch length P={p} exceeds the Triton kernel's {MAX_P}; set EQRECON_KERNELS=ref")


def _check_linear(hidden, weight, bias, target) -> None:
    if hidden.dim() < 2 or weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"recon_loss_linear: want hidden (B, K, N, C), weight (P, C), bias (P,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    p, c = weight.shape
    if hidden.shape[-1] != c or bias.shape[0] != p or target.shape != (*hidden.shape[:-1], p):
        raise ValueError(
            f"recon_loss_linear: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, bias "
            f"{tuple(bias.shape)} and target {tuple(target.shape)} do not fit: hidden[..., C] @ weight(P, C)ᵀ "
            f"must give target[..., P]"
        )
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("target", target)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"recon_loss_linear: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.device != hidden.device:
            raise ValueError(f"recon_loss_linear: {name} on {t.device} but hidden on {hidden.device}")
    if hidden.numel() == 0:
        raise ValueError(f"recon_loss_linear: empty hidden {tuple(hidden.shape)}")


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class _ReconLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, norm_pix: bool):
        pred2, target2 = _as_rows(pred), _as_rows(target)
        grad = torch.empty_like(pred2) if ctx.needs_input_grad[0] else None
        loss = _sum_sq_and_grad(pred2, target2, grad, norm_pix, 2.0 / pred.numel()) / pred.numel()
        ctx.save_for_backward(grad.view(pred.shape) if grad is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # scaled in place: a second backward through the same graph fails autograd's version check
        return grad.mul_(grad_loss.to(grad.dtype)) if grad is not None else None, None, None


class _ReconLossLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, norm_pix: bool):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        p, c = weight.shape
        h2, t2 = _as_rows(hidden), _as_rows(target)  # (R, C), (R, P)
        r = h2.shape[0]
        w, b = weight.to(hidden.dtype), bias.to(hidden.dtype)
        numel = r * p
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros((p, c), device=hidden.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros((p,), device=hidden.device, dtype=torch.float32) if need_b else None
        write_grad = need_h or need_w or need_b
        # chunks of rows so that one chunk's pred is about the size of hidden (P/C chunks)
        chunk = triton.cdiv(r, max(1, triton.cdiv(p, c)))
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, r, chunk):
            hc = h2[start : start + chunk]
            pc = torch.addmm(b, hc, w.t())  # (rows, P) in hidden's dtype
            total += _sum_sq_and_grad(pc, t2[start : start + chunk], pc if write_grad else None, norm_pix,
                                      2.0 / numel)  # fmt: skip
            # pc now holds dL/dpred for these rows
            if need_h:
                torch.mm(pc, w, out=grad_h[start : start + chunk])
            if need_w:
                grad_w += torch.mm(pc.t(), hc).float()
            if need_b:
                grad_b += pc.sum(0, dtype=torch.float32)
        ctx.save_for_backward(
            grad_h.view(hidden.shape) if need_h else None,
            grad_w if need_w else None,
            grad_b if need_b else None,
        )
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return total / numel

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None


# ---------------------------------------------------------------------------------------------
# Public functions and references
# ---------------------------------------------------------------------------------------------

def recon_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error over all elements (fp32 scalar); Triton or reference per EQRECON_KERNELS."""
    _check_pair(pred, target)
    if _backend.use_triton(pred, target):
        _check_p(pred.shape[-1], "recon_loss")
        return _ReconLoss.apply(pred, target, bool(norm_pix))
    return recon_loss_ref(pred, target, norm_pix)


def recon_loss_ref(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Plain PyTorch pixel MSE in fp32."""
    t = target.float()
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, unbiased=False, keepdim=True)
        t = (t - mean) / torch.sqrt(var + NORM_PIX_EPS)
    return (pred.float() - t).square().mean()


def recon_loss_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """recon_loss(hidden @ weightᵀ + bias, target, norm_pix) without materialising the prediction."""
    _check_linear(hidden, weight, bias, target)
    if _backend.use_triton(hidden, weight, bias, target):
        _check_p(weight.shape[0], "recon_loss_linear")
        return _ReconLossLinear.apply(hidden, weight, bias, target, bool(norm_pix))
    return recon_loss_linear_ref(hidden, weight, bias, target, norm_pix)


def recon_loss_linear_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Plain PyTorch: the pixel head in hidden's dtype, then `recon_loss_ref`."""
    return recon_loss_ref(F.linear(hidden, weight.to(hidden.dtype), bias.to(hidden.dtype)), target, norm_pix)
