"""The kernel parity check, shared by the kernel tests: a kernel's output or gradient against the fp64
reference, within twice PyTorch's own low-precision error plus a few units in the last place."""

from __future__ import annotations

import pytest
import torch

ULPS = {torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_parity(name: str, got: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor, dtype) -> None:
    """max|got − exact| ≤ 2·max|torch_lowp − exact| + atol; prints max and mean diffs on failure.

    exact is the fp64 reference, torch_lowp the same reference run by PyTorch in `dtype`; atol is a
    few units in the last place of `dtype` at the largest |exact|: 2 for 16-bit outputs (their own
    rounding), 16 for fp32 (sums over hundreds of terms in another order; still ~2e-6 relative).
    """
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.detach().double().cpu() - exact.detach().double().cpu()).abs()
    torch_err = (torch_lowp.detach().double().cpu() - exact.detach().double().cpu()).abs()
    atol = ULPS[dtype] * torch.finfo(dtype).eps * max(exact.detach().abs().max().item(), 1e-3)
    bound = 2 * torch_err.max().item() + atol
    assert err.max().item() <= bound, (
        f"{name} ({dtype}): max diff {err.max().item():.3e}, mean diff {err.mean().item():.3e} > bound "
        f"{bound:.3e} (PyTorch's own max {torch_err.max().item():.3e}, mean {torch_err.mean().item():.3e})"
    )
