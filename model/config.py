"""`ModelConfig`: the encoder, its channel split, the decoder and the loss weights of one method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    method: str = "path"  # vicreg | sie | xattn | path
    backbone: str = "vit_small_patch16_224"  # a timm ViT name (tiny/small/base/large, patch 16)
    patch_size: int = 16  # overrides the timm default (the demo uses 8 at 64 px)
    depth: int = 0  # 0 = the timm model's depth
    drop_path: float = 0.0
    d_patch: int = 512  # linear head on the patch tokens: z = [z_inv | z_eq]
    d_inv: int = 256  # channels of z_inv; z_eq gets d_patch - d_inv (vicreg: all channels invariant)
    pool: str = "mean"  # pooling of z_inv tokens for the SSL loss: mean | cls
    decoder: str = "xattn-path"  # conv | xattn | xattn-path (path method); xattn method uses xattn
    dec_width: int = 192
    dec_depth: int = 6  # xattn decoders: block 1 cross-attention, the rest self-attention
    dec_heads: int = 3
    conv_width: int = 256  # conv decoder: channels after the linear layer (halved per x2 stage)
    lam: float = 1.0  # weight of the equivariant (reconstruction or SIE prediction) loss
    norm_pix: bool = False  # per-patch normalised reconstruction targets
    recon_reduction: str = "mean"  # mean: per pixel; sum: per image, ‖û_k - u_k‖² as the path paper's Eq. 3
    mask_ratio: float = 0.0  # xattn: fraction of view-2 query tokens replaced by a mask token (Siamese MAE)
    sim_coeff: float = 25.0  # VICReg invariance / variance / covariance weights
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    expander: tuple[int, ...] = (2048, 2048, 2048)  # VICReg expander MLP widths on pooled z_inv
    equi_factor: float = 4.5  # SIE: weight of the prediction MSE relative to sim_coeff (official default)
