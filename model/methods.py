"""The four methods (docs/DESIGN.md §1): each an nn.Module whose forward(batch) returns its loss terms.

    method = build_method(cfg.model, cfg.data)
    out = method(batch)      # {"loss", "loss/inv", "loss/eq", "loss/inv.sim", ...}
    out["loss"].backward()

loss = loss/inv + λ · loss/eq. Both views go through the encoder as one 2B batch (a ViT has no batch
statistics, so this equals two calls). `reconstruct(batch)` gives the decoder's images for the
trainer's picture (None for methods that reconstruct nothing).
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
from model.losses import sie_loss, vicreg_loss
from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError
from pipeline.path import CROP1, CROP2, G_DIM, IDX, THETA_DIM, PathConfig

RECON_REDUCTIONS = ("mean", "sum")
TRANSFORM_DIM = G_DIM + 4 + 1  # SIE's transformation code: g, crop-box difference, flip difference

# Parameters that weight decay should skip besides biases and norm weights (timm's convention).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "step_embed", "view_embed")


def build_expander(d_in: int, widths: tuple[int, ...]) -> nn.Module:
    """VICReg's expander: (Linear, BatchNorm, ReLU) per hidden width, a plain Linear last; () = none."""
    if not widths:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(d_in, width))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        d_in = width
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    """VICReg: the whole z is invariant, VICReg on it pooled; loss/eq is a zero tensor. The other
    methods subclass it and add their equivariant part."""

    name = "vicreg"
    all_invariant = True

    def __init__(self, cfg: ModelConfig, data: DataConfig):
        super().__init__()
        self.cfg = cfg
        # λ, read at every forward: model.grad_ratio's controller (train/schedules.py) moves it in training.
        self.lam = cfg.lam
        self.img_size = data.img_size
        self.encoder = SplitEncoder(cfg, data.img_size, all_invariant=self.all_invariant)
        self.expander = build_expander(self.encoder.d_inv, tuple(cfg.expander))

    def encode(self, batch: Batch) -> tuple[SplitOutput, SplitOutput]:
        """Both views through the encoder in one pass: SplitOutput for view 1 and view 2."""
        for name in ("view1", "view2"):
            shape = tuple(getattr(batch, name).shape)
            if len(shape) != 4 or shape[1:] != (3, self.img_size, self.img_size):
                raise ValueError(
                    f"batch.{name} has shape {shape}, the model expects (B, 3, {self.img_size}, "
                    f"{self.img_size}) (data.img_size)"
                )
        out = self.encoder(torch.cat([batch.view1, batch.view2]))
        halves = [t.chunk(2) for t in out]
        return SplitOutput(*(h[0] for h in halves)), SplitOutput(*(h[1] for h in halves))

    def invariance(self, o1: SplitOutput, o2: SplitOutput) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        # The expander runs per view so that its BatchNorm statistics are per view, as in VICReg.
        loss, terms = vicreg_loss(
            self.expander(o1.z_inv), self.expander(o2.z_inv), cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff
        )
        return {"loss/inv": loss, **{f"loss/inv.{k}": v.detach() for k, v in terms.items()}}

    def equivariance(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> dict[str, torch.Tensor]:
        return {"loss/eq": torch.zeros((), device=batch.view1.device)}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        o1, o2 = self.encode(batch)
        out = self.invariance(o1, o2)
        out.update(self.equivariance(batch, o1, o2))
        out["loss"] = out["loss/inv"] + self.lam * out["loss/eq"]
        return out

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor | None:
        """Predicted images (B, K', 3, Ht, Wt) in the batch's normalisation, or None."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: biases, norms, embeddings."""
        return {
            n for n, p in self.named_parameters() if p.ndim <= 1 or n.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        }


class SIE(VICReg):
    """SIE as the official code composes it: the split z is projected per part (an invariant and an
    equivariant expander, widths in proportion to the parts), regularised as one concatenated vector,
    and a bias-free linear hypernetwork predicts the equivariant projection of view 2 from view 1's
    and the transformation between the views (`transformation_code`)."""

    name = "sie"
    all_invariant = False

    def __init__(self, cfg: ModelConfig, data: DataConfig):
        super().__init__(cfg, data)
        enc = self.encoder
        # The official code scales every expander width by the part's share of the representation.
        share = lambda d: tuple(max(1, round(w * d / enc.d_patch)) for w in cfg.expander)
        self.expander = build_expander(enc.d_inv, share(enc.d_inv))
        self.expander_eq = build_expander(enc.d_eq, share(enc.d_eq))
        d_pred = share(enc.d_eq)[-1] if cfg.expander else enc.d_eq
        self.register_buffer("theta_scale", theta_scale(data.aug), persistent=False)
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

    def equivariance(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> dict[str, torch.Tensor]:
        """SIE's prediction term alone (its equivariant part beside another invariant loss, the DINO
        family's): sie_loss's eq on the equivariant projections; its invariant half is discarded."""
        cfg = self.cfg
        x_eq, y_eq = self.expander_eq(o1.z_eq_pooled), self.expander_eq(o2.z_eq_pooled)
        pred = self.predictor(x_eq, self.transformation_code(batch.theta))
        _, eq, terms = sie_loss(
            o1.z_inv.detach(),
            o2.z_inv.detach(),
            x_eq,
            y_eq,
            pred,
            cfg.sim_coeff,
            cfg.std_coeff,
            cfg.cov_coeff,
            cfg.equi_factor,
        )
        return {"loss/eq": eq, **{f"loss/eq.{k}": terms[k].detach() for k in ("pred", "pred_std")}}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        o1, o2 = self.encode(batch)
        # Each expander runs per view so that its BatchNorm statistics are per view.
        x_inv, y_inv = self.expander(o1.z_inv), self.expander(o2.z_inv)
        x_eq, y_eq = self.expander_eq(o1.z_eq_pooled), self.expander_eq(o2.z_eq_pooled)
        pred = self.predictor(x_eq, self.transformation_code(batch.theta))
        inv, eq, terms = sie_loss(
            x_inv, y_inv, x_eq, y_eq, pred, cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff, cfg.equi_factor
        )
        out = {"loss/inv": inv, "loss/eq": eq}
        out.update(
            {f"loss/{'eq' if k.startswith('pred') else 'inv'}.{k}": v.detach() for k, v in terms.items()}
        )
        out["loss"] = inv + self.lam * eq
        return out


class XAttn(VICReg):
    """Cross-attention reconstruction: VICReg on z_inv; the `xattn` decoder reconstructs view 2 (at
    data.img_size) from the z_eq tokens of both views (model.decoder is not consulted)."""

    name = "xattn"
    all_invariant = False

    def __init__(self, cfg: ModelConfig, data: DataConfig):
        super().__init__(cfg, data)
        self.grid = self.encoder.grid
        self.target_size, self.steps = self.target_geometry(data)
        name = self.decoder_name(cfg)
        check_decoder_config(name, cfg, self.grid, self.target_size)
        if cfg.recon_reduction not in RECON_REDUCTIONS:
            raise ConfigError(
                f"unknown model.recon_reduction {cfg.recon_reduction!r}; choose from "
                f"{', '.join(RECON_REDUCTIONS)}"
            )
        if not 0 <= cfg.mask_ratio < 1:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
        self.decoder = build_decoder(name, self.encoder.d_eq, self.grid, self.target_size, self.steps, cfg)

    def decoder_name(self, cfg: ModelConfig) -> str:
        return "xattn"

    def target_geometry(self, data: DataConfig) -> tuple[int, int]:
        """(target size, number of targets K)."""
        return data.img_size, 1

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch.view2[:, None]  # (B, 1, 3, H, W)

    def equivariance(self, batch: Batch, o1: SplitOutput, o2: SplitOutput) -> dict[str, torch.Tensor]:
        loss = self.decoder.loss(o1.z_eq, o2.z_eq, self.targets(batch), self.cfg.norm_pix)  # per pixel
        if self.cfg.recon_reduction == "sum":  # per image: × the values of one target image
            loss = loss * (3 * self.target_size**2)
        return {"loss/eq": loss}

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor:
        o1, o2 = self.encode(batch)
        pred = self.decoder(o1.z_eq, o2.z_eq).float()  # (B, K, N, P)
        if self.cfg.norm_pix:
            pred = denormalise_patches(pred, patchify(self.targets(batch).float(), self.grid))
        return unpatchify(pred, self.grid)


class PathRecon(XAttn):
    """Transformed-image reconstruction along the augmentation path: the decoder (`conv` or
    `xattn-path`) reconstructs the K intermediate images u_k from the z_eq tokens of both views."""

    name = "path"

    def decoder_name(self, cfg: ModelConfig) -> str:
        if cfg.decoder not in ("conv", "xattn-path"):
            raise ConfigError(
                f"model.decoder={cfg.decoder!r} is not a path decoder; choose conv or xattn-path "
                f"(the xattn method uses the xattn decoder)"
            )
        return cfg.decoder

    def target_geometry(self, data: DataConfig) -> tuple[int, int]:
        if data.aug.k < 1:
            raise ConfigError(
                f"the path method reconstructs K >= 1 intermediate images, but data.aug.k={data.aug.k}"
            )
        return data.out_target_size, data.aug.k

    def targets(self, batch: Batch) -> torch.Tensor:
        want = (len(batch), self.steps, 3, self.target_size, self.target_size)
        if tuple(batch.targets.shape) != want:
            raise ValueError(
                f"batch.targets has shape {tuple(batch.targets.shape)}, the path method expects {want} "
                f"(data.aug.k, data.target_size)"
            )
        return batch.targets


METHODS: dict[str, type[VICReg]] = {"vicreg": VICReg, "sie": SIE, "xattn": XAttn, "path": PathRecon}


def theta_scale(aug: PathConfig) -> torch.Tensor:
    """Half-ranges of θ's g entries (G,), so that θ_g / scale is of order 1: pipeline.path's table."""
    from pipeline.path import theta_scale as path_theta_scale  # the one owner of the θ ranges

    return path_theta_scale(aug)
