"""The Triton side of `kernels.recon_loss`: the fused pixel-MSE kernel and its launcher.

Imported only when the Triton path runs (`kernels.recon_loss` imports it lazily), so that
`import kernels` works where triton does not import. The maths is in recon_loss.py's docstring.

The kernel is persistent: program `pid` walks row blocks pid, pid + G, pid + 2G ... (G programs),
so per-program sums (the loss, and the bias gradient of the fused pixel head) are few and are added
up afterwards in a fixed order: deterministic, no atomics. Targets are read either as rows of
patches (R, P) or straight from images (B, K, C, Ht, Wt) through their strides, so no patchified
copy of the targets is ever made: element (row r, column c) of the patch view is
    r = ((b·K + k)·g + gy)·g + gx,  c = (py·p + px)·C + ch  ->  image[b, k, ch, gy·p + py, gx·p + px]
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import _backend


def _recon_fwd(
    PRED, TARGET, GRAD, PARTIAL, BIAS_PARTIAL,
    R, P, N_BLOCKS, inv_p, grad_scale, eps,
    STEPS, GRID, PATCH, CH, stb, stk, stc, sth, stw,
    NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, IMAGES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_P)
    col_ok = cols < P
    if IMAGES:  # column c -> (py, px, ch) inside a patch, as image offsets
        c_off = (cols // (PATCH * CH)) * sth + ((cols // CH) % PATCH) * stw + (cols % CH) * stc
    total = tl.zeros([BLOCK_R], tl.float32)
    bias_grad = tl.zeros([BLOCK_P], tl.float32)
    for blk in range(pid, N_BLOCKS, n_prog):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * P + cols[None, :]  # (BLOCK_R, BLOCK_P), pred rows contiguous
        if IMAGES:  # row r -> (b, k, gy, gx)
            bk = rows // (GRID * GRID)
            n = rows % (GRID * GRID)
            r_off = (
                (bk // STEPS).to(tl.int64) * stb
                + (bk % STEPS) * stk
                + (n // GRID) * PATCH * sth
                + (n % GRID) * PATCH * stw
            )
            t = tl.load(TARGET + r_off[:, None] + c_off[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            t = tl.load(TARGET + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(t, 1) * inv_p
            centred = tl.where(mask, t - mean[:, None], 0.0)
            var = tl.sum(centred * centred, 1) * inv_p  # biased: divided by P
            t = centred / tl.sqrt(var + eps)[:, None]
        x = tl.load(PRED + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, x - t, 0.0)
        total += tl.sum(diff * diff, 1)
        if WRITE_GRAD:
            # GRAD may alias PRED (recon_loss_linear): each element is read above before it is written
            grad = (diff * grad_scale).to(GRAD.dtype.element_ty)
            tl.store(GRAD + offs, grad, mask=mask)
            if BIAS_GRAD:  # the bias gradient sums the gradient as stored, over rows, in fp32
                bias_grad += tl.sum(grad.to(tl.float32), 0)
    tl.store(PARTIAL + pid, tl.sum(total, 0))
    if BIAS_GRAD:
        tl.store(BIAS_PARTIAL + pid * P + cols, bias_grad, mask=col_ok)


def _blocks(p: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_P, num_warps): about 4096 elements per row block, whole rows."""
    block_p = triton.next_power_of_2(p)
    block_r = max(1, min(64, 4096 // block_p))
    return block_r, block_p, 4 if block_r * block_p <= 4096 else 8


def _programs(device: torch.device, n_blocks: int) -> int:
    """Persistent grid: a few programs per SM on CUDA; few in the interpreter (one program at a time)."""
    if device.type == "cuda":
        return min(n_blocks, 8 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_blocks, 4)


def sum_sq_and_grad(
    pred2,
    target,
    image_geometry,
    grad2,
    norm_pix: bool,
    eps: float,
    grad_scale: float,
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ(pred − t)² as an fp32 0-dim tensor, Σ_rows grad (P,) fp32 or None) over pred2's (R, P) rows.

    target is (R, P) rows or, with image_geometry = (K, grid, patch), images (B, K, C, Ht, Wt) read
    through their strides. Writes grad_scale·(pred − t) into grad2 when given (it may be pred2).
    """
    r, p = pred2.shape
    block_r, block_p, warps = _blocks(p)
    n_blocks = triton.cdiv(r, block_r)
    n_prog = _programs(pred2.device, n_blocks)
    partial = torch.empty(n_prog, device=pred2.device, dtype=torch.float32)
    bias_partial = (
        torch.empty((n_prog, p), device=pred2.device, dtype=torch.float32) if bias_grad else partial
    )
    if image_geometry is not None:
        k, grid, patch = image_geometry
        geometry = (k, grid, patch, target.shape[2], target.stride(0), target.stride(1), *target.stride()[2:])
    else:
        geometry = (1, 1, 1, 1, 0, 0, 0, 0, 0)
    kernel = _backend.kernel_for(_recon_fwd)
    with torch.cuda.device(pred2.device) if pred2.is_cuda else contextlib.nullcontext():
        kernel[(n_prog,)](
            pred2, target, grad2 if grad2 is not None else pred2, partial, bias_partial,
            r, p, n_blocks, 1.0 / p, grad_scale, eps, *geometry,
            NORM_PIX=norm_pix, WRITE_GRAD=grad2 is not None, BIAS_GRAD=bias_grad,
            IMAGES=image_geometry is not None, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=warps,
        )  # fmt: skip
    return partial.sum(), (bias_partial.sum(0) if bias_grad else None)
