"""Fused Triton kernels for the reconstruction decoder, each beside its PyTorch reference.

`cross_attention(q, k, v, scale=None)` and `recon_loss(pred, target, norm_pix=False)` (plus the fused
`recon_loss_linear`) dispatch through one switch, `EQRECON_KERNELS=triton|ref` (see `_backend`):
Triton on CUDA by default, the `*_ref` elsewhere. The `*_ref` functions are the parity oracles that
tests and benchmarks import.
"""

from kernels._backend import use_triton
from kernels.cross_attention import cross_attention, cross_attention_ref
from kernels.recon_loss import recon_loss, recon_loss_linear, recon_loss_linear_ref, recon_loss_ref

__all__ = [
    "cross_attention",
    "cross_attention_ref",
    "recon_loss",
    "recon_loss_linear",
    "recon_loss_linear_ref",
    "recon_loss_ref",
    "use_triton",
]
