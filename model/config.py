"""`ModelConfig`: the encoder, its channel split, the decoder and the loss weights of one method;
`DinoConfig`: the DINO family's head and loss (model.family != vicreg)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DinoConfig:
    """The DINO family's head and loss knobs (model/dino_objective.py, model/dino.py); its teacher's
    schedules are optim.teacher (train/config.py), which train/schedules.py reads."""

    out_dim: int = 8192  # K prototypes: DINOv2 65536, iBOT 8192
    hidden_dim: int = 2048  # DINO head: 3-layer MLP, hidden 2048, bottleneck 256
    bottleneck_dim: int = 256  # DINO head bottleneck before the prototypes
    nlayers: int = 3  # DINO head MLP layers before the bottleneck
    norm_last_layer: bool = True  # fix the prototypes' weight-norm gain at 1 (DINO, iBOT); DINOv2: False
    student_temp: float = 0.1  # model/dino.py's STUDENT_TEMP (this module imports no torch)
    center_momentum: float = 0.9  # model/dino.py's CENTER_MOMENTUM
    ibot_weight: float = 1.0  # iBOT's lambda2, DINOv2's ibot_loss_weight
    koleo_weight: float = 0.1  # DINOv2


@dataclass
class ModelConfig:
    # model/__init__.py's registries: INVARIANT[family] and EQUIVARIANT[method].
    family: str = "vicreg"  # the invariant objective: vicreg | dino | ibot | dinov2 (model.dino)
    method: str = "path"  # the equivariant part: none | sie | xattn | path
    backbone: str = "vit_small_patch16_224"  # a timm ViT name (tiny/small/base/large, patch 16)
    patch_size: int = 16  # overrides the timm default (the demo uses 8 at 64 px)
    depth: int = 0  # 0 = the timm model's depth
    drop_path: float = 0.0  # stochastic depth rate of the ViT blocks (timm drop_path_rate)
    d_patch: int = 512  # linear head on the patch tokens: z = [z_inv | z_eq]
    d_inv: int = 256  # channels of z_inv; z_eq gets d_patch - d_inv (vicreg: all channels invariant)
    pool: str = "mean"  # pooling of z_inv tokens for the SSL loss: mean | cls
    decoder: str = "xattn-path"  # conv | xattn | xattn-path (path method); xattn method uses xattn
    dec_width: int = 192  # xattn decoders: token width
    dec_depth: int = 6  # xattn decoders: block 1 cross-attention, the rest self-attention
    dec_heads: int = 3  # xattn decoders: attention heads
    conv_width: int = 256  # conv decoder: channels after the linear layer (halved per x2 stage)
    lam: float = 1.0  # weight of the equivariant (reconstruction or SIE prediction) loss
    grad_ratio: float = 0.0  # > 0: λ adapted so that diag/grad_ratio ‖∇λL_eq‖/‖∇L_inv‖ ≈ this; 0 = off
    grad_ratio_every: int = 10  # the controller measures the ratio every N steps (1 forward + 2 backward)
    lam_range: tuple[float, float] = (0.01, 1000.0)  # bounds of the adapted λ (model.lam is its start)
    norm_pix: bool = False  # per-patch normalised reconstruction targets
    recon_reduction: str = "mean"  # mean: per pixel; sum: per image, ‖û_k - u_k‖² as the path paper's Eq. 3
    mask_ratio: float = 0.0  # xattn: fraction of view-2 query tokens replaced by a mask token (Siamese MAE)
    sim_coeff: float = 25.0  # VICReg invariance / variance / covariance weights
    std_coeff: float = 25.0  # VICReg variance weight
    cov_coeff: float = 1.0  # VICReg covariance weight
    expander: tuple[int, ...] = (2048, 2048, 2048)  # VICReg expander MLP widths on pooled z_inv (SIE: split)
    equi_factor: float = 4.5  # SIE: weight of the prediction MSE relative to sim_coeff (official default)
    dino: DinoConfig = field(default_factory=DinoConfig)
