"""Fused Triton kernels for the reconstruction decoder, each beside its PyTorch reference.

`cross_attention(q, k, v, scale=None)` and `recon_loss(pred, target, norm_pix=False)` (plus the fused
`recon_loss_linear`) dispatch through one switch, `EQRECON_KERNELS=auto|triton|ref` (see `_backend`):
on CUDA `auto` times Triton against the PyTorch alternatives once per shape and keeps the faster
(`choices()` lists what it kept); on CPU the `*_ref` run. `self_attention` is SDPA. The `*_ref`
functions are the parity oracles that tests and benchmarks import. triton is imported on first use
of a Triton path only, so this package imports without it.
"""

from kernels._backend import choices, use_triton
from kernels.cross_attention import cross_attention, cross_attention_ref, self_attention
from kernels.recon_loss import (
    image_patches,
    recon_loss,
    recon_loss_linear,
    recon_loss_linear_ref,
    recon_loss_ref,
)

__all__ = [
    "choices",
    "cross_attention",
    "cross_attention_ref",
    "image_patches",
    "recon_loss",
    "recon_loss_linear",
    "recon_loss_linear_ref",
    "recon_loss_ref",
    "self_attention",
    "use_triton",
]
