"""The equivariant parts (docs/DESIGN.md §1): what trains z_eq, beside any invariant objective.

    part = EQUIVARIANT[cfg.method](cfg, data, encoder, invariant)   # model/__init__.py's registry
    terms, joint = part(batch, o1, o2)      # o1, o2: SplitOutput of the two (global) views
    terms["loss/eq"]                        # scalar; the method's loss is loss/inv + λ · loss/eq

`joint`: projections (view 1, view 2) that an invariant objective able to regularise them jointly
(VICReg) takes into its variance and covariance terms (SIE's official composition), or None.
`reconstruct(batch, o1, o2)` gives the decoder's images for the trainer's picture and `targets(batch)`
what they are scored against (None for parts that reconstruct nothing).

| part  | trains z_eq by                                                                      |
| ----- | ----------------------------------------------------------------------------------- |
| none  | nothing: the encoder has no z_eq channels (d_inv = d_patch)                         |
| sie   | a hypernetwork predicting view 2's z_eq projection from view 1's and θ (SIE)        |
| xattn | the `xattn` decoder reconstructing view 2 from both views' z_eq tokens              |
| path  | the `conv` or `xattn-path` decoder reconstructing the K intermediate images u_k     |
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.decoders import (
    HyperPredictor,
    build_decoder,
    check_decoder_config,
    denormalise_patches,
    patchify,
    unpatchify,
)
from model.encoder import SplitEncoder, SplitOutput
from model.invariant import build_expander
from model.losses import sie_prediction_loss
from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError
from pipeline.path import CROP1, CROP2, G_DIM, IDX, THETA_DIM

RECON_REDUCTIONS = ("mean", "sum")
TRANSFORM_DIM = G_DIM + 4 + 1  # SIE's transformation code: g, crop-box difference, flip difference
Terms = dict[str, torch.Tensor]
Joint = tuple[torch.Tensor, torch.Tensor] | None


class NoEquivariant(nn.Module):
    """No equivariant part: loss/eq is a zero tensor and every channel of z is invariant."""

    uses_eq_channels = False

    def __init__(self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder, invariant=None):
        super().__init__()

    def forward(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> tuple[Terms, Joint]:
        return {"loss/eq": torch.zeros((), device=batch.view1.device)}, None

    def reconstruct(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> torch.Tensor | None:
        return None

    def targets(self, batch: Batch) -> torch.Tensor | None:
        return None


class SIE(nn.Module):
    """SIE as the official code composes it: z_eq projected by its own expander (widths model.expander
    scaled by the part's share of the channels) and a bias-free linear hypernetwork predicting view 2's
    projection from view 1's and the transformation between the views (`transformation_code`). The
    projections are `joint`: VICReg regularises them with its own, and SIE splits VICReg's expander
    in proportion to the parts (`invariant.resize_expander`)."""

    uses_eq_channels = True

    def __init__(self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder, invariant=None):
        super().__init__()
        self.cfg = cfg
        # The official code scales every expander width by the part's share of the representation.
        share = lambda d: tuple(max(1, round(w * d / encoder.d_patch)) for w in cfg.expander)
        if hasattr(invariant, "resize_expander"):
            invariant.resize_expander(share(encoder.d_inv))
        self.expander_eq = build_expander(encoder.d_eq, share(encoder.d_eq))
        d_pred = share(encoder.d_eq)[-1] if cfg.expander else encoder.d_eq
        self.register_buffer("theta_scale", theta_scale(data), persistent=False)
        self.predictor = HyperPredictor(TRANSFORM_DIM, d_pred)

    def transformation_code(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (B, P) -> (B, TRANSFORM_DIM): g's parameters over their half-ranges, then the crop box
        difference A2 - A1 and the flip difference flip2 - flip1 (what relates view 2 to view 1)."""
        if theta.dim() != 2 or theta.shape[1] < THETA_DIM:
            raise ValueError(f"batch.theta has shape {tuple(theta.shape)}, expected (B, {THETA_DIM})")
        g = theta[:, :G_DIM] / self.theta_scale
        crop = theta[:, CROP2] - theta[:, CROP1]
        flip = theta[:, IDX["flip2"] : IDX["flip2"] + 1] - theta[:, IDX["flip1"] : IDX["flip1"] + 1]
        return torch.cat([g, crop, flip], dim=1)

    def forward(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> tuple[Terms, Joint]:
        cfg = self.cfg
        # The expander runs per view so that its BatchNorm statistics are per view.
        x_eq, y_eq = self.expander_eq(o1.z_eq_pooled), self.expander_eq(o2.z_eq_pooled)
        pred = self.predictor(x_eq, self.transformation_code(batch.theta))
        eq, terms = sie_prediction_loss(pred, y_eq, cfg.sim_coeff, cfg.std_coeff, cfg.equi_factor)
        return {"loss/eq": eq, **{f"loss/eq.{k}": v.detach() for k, v in terms.items()}}, (x_eq, y_eq)

    def reconstruct(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> torch.Tensor | None:
        return None

    def targets(self, batch: Batch) -> torch.Tensor | None:
        return None


class Reconstruction(nn.Module):
    """Pixel reconstruction from the z_eq tokens of both views: `xattn` (path=False) reconstructs view 2
    at data.img_size with the `xattn` decoder (model.decoder is not consulted); `path` (path=True) the
    K intermediate images u_k with model.decoder (`conv` or `xattn-path`)."""

    uses_eq_channels = True

    def __init__(
        self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder, invariant=None, path: bool = False
    ):
        super().__init__()
        self.cfg, self.path, self.grid = cfg, path, encoder.grid
        if path and cfg.decoder not in ("conv", "xattn-path"):
            raise ConfigError(
                f"model.decoder={cfg.decoder!r} is not a path decoder; choose conv or xattn-path "
                f"(the xattn method uses the xattn decoder)"
            )
        if path and data.aug.k < 1:
            raise ConfigError(
                f"the path method reconstructs K >= 1 intermediate images, but data.aug.k={data.aug.k}"
            )
        name = cfg.decoder if path else "xattn"
        # (target size, number of targets K)
        self.target_size, self.steps = (data.out_target_size, data.aug.k) if path else (data.img_size, 1)
        check_decoder_config(name, cfg, self.grid, self.target_size)
        if cfg.recon_reduction not in RECON_REDUCTIONS:
            raise ConfigError(
                f"unknown model.recon_reduction {cfg.recon_reduction!r}; choose from "
                f"{', '.join(RECON_REDUCTIONS)}"
            )
        if not 0 <= cfg.mask_ratio < 1:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
        self.decoder = build_decoder(name, encoder.d_eq, self.grid, self.target_size, self.steps, cfg)

    def targets(self, batch: Batch) -> torch.Tensor:
        """(B, K, 3, Ht, Wt): view 2 (xattn) or the path's intermediate images."""
        if not self.path:
            return batch.view2[:, None]
        want = (len(batch), self.steps, 3, self.target_size, self.target_size)
        if tuple(batch.targets.shape) != want:
            raise ValueError(
                f"batch.targets has shape {tuple(batch.targets.shape)}, the path method expects {want} "
                f"(data.aug.k, data.target_size)"
            )
        return batch.targets

    def forward(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> tuple[Terms, Joint]:
        loss = self.decoder.loss(o1.z_eq, o2.z_eq, self.targets(batch), self.cfg.norm_pix)  # per pixel
        if self.cfg.recon_reduction == "sum":  # per image: × the values of one target image
            loss = loss * (3 * self.target_size**2)
        return {"loss/eq": loss}, None

    @torch.no_grad()
    def reconstruct(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> torch.Tensor:
        pred = self.decoder(o1.z_eq, o2.z_eq).float()  # (B, K, N, P)
        if self.cfg.norm_pix:
            pred = denormalise_patches(pred, patchify(self.targets(batch).float(), self.grid))
        return unpatchify(pred, self.grid)


class Path(Reconstruction):
    """`path`: Reconstruction along the augmentation path (the registry's name for path=True)."""

    def __init__(self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder, invariant=None):
        super().__init__(cfg, data, encoder, invariant, path=True)


def theta_scale(data: DataConfig) -> torch.Tensor:
    """Half-ranges of θ's g entries (G,), so that θ_g / scale is of order 1: pipeline.path's table."""
    from pipeline.path import theta_scale as path_theta_scale  # the one owner of the θ ranges

    return path_theta_scale(data.aug)
