"""VICReg as an invariant objective (docs/DESIGN.md §1); the DINO family is model/dino_objective.py.

An invariant objective is an nn.Module with

    after_equivariant: bool                       # built after the equivariant part (init order)
    views = objective.encode(encoder, batch)      # Views: o1, o2 (SplitOutput of the two global views)
    terms = objective(encoder, batch, views, joint, teacher_temp)   # {"loss/inv", "loss/inv.<term>", ...}

and, when it trains against a teacher, `teacher` (model/teacher.py's EMATeacher) and
`update_teacher(encoder, momentum)`; otherwise `teacher = None`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.encoder import SplitEncoder, SplitOutput
from model.losses import vicreg_loss
from pipeline.batch import Batch, DataConfig


class Views(NamedTuple):
    """The student pass of one batch: the two global views (what the equivariant part reads) and
    whatever else the objective needs from the same pass."""

    o1: SplitOutput
    o2: SplitOutput
    extra: Any = None


def encode_views(encoder: SplitEncoder, batch: Batch, masks: torch.Tensor | None = None) -> Views:
    """Both views through the encoder in one 2B batch (a ViT has no batch statistics, so this equals
    two calls); masks (2B, N) bool in the same view-major order, or None."""
    size = encoder.timm_kwargs["img_size"]
    for name in ("view1", "view2"):
        shape = tuple(getattr(batch, name).shape)
        if shape != (len(batch), 3, size, size):
            raise ValueError(
                f"batch.{name} has shape {shape}, the model expects ({len(batch)}, 3, {size}, {size}) "
                f"(data.img_size)"
            )
    out = encoder(torch.cat([batch.view1, batch.view2]), masks)
    halves = [t.chunk(2) for t in out]
    return Views(SplitOutput(*(h[0] for h in halves)), SplitOutput(*(h[1] for h in halves)))


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
    """VICReg on the pooled z_inv of the two views, through the expander (model.expander widths)."""

    after_equivariant = False
    teacher = None

    def __init__(self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder):
        super().__init__()
        self.cfg, self.d_in = cfg, encoder.d_inv
        self.expander = build_expander(encoder.d_inv, tuple(cfg.expander))

    def resize_expander(self, widths: tuple[int, ...]) -> None:
        """A new expander of these widths (SIE's composition: the projector split between the parts)."""
        self.expander = build_expander(self.d_in, widths)

    def encode(self, encoder: SplitEncoder, batch: Batch) -> Views:
        return encode_views(encoder, batch)

    def forward(
        self, encoder: SplitEncoder, batch: Batch, views: Views, joint=None, teacher_temp=None
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        # The expander runs per view so that its BatchNorm statistics are per view, as in VICReg.
        loss, terms = vicreg_loss(
            self.expander(views.o1.z_inv),
            self.expander(views.o2.z_inv),
            cfg.sim_coeff,
            cfg.std_coeff,
            cfg.cov_coeff,
            joint=joint,
        )
        return {"loss/inv": loss, **{f"loss/inv.{k}": v.detach() for k, v in terms.items()}}
