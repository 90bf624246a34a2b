"""A method = the split encoder + an invariant objective + an equivariant part (docs/DESIGN.md §1).

    method = build_method(cfg.model, cfg.data)            # model/__init__.py: the registries
    out = method(batch, **schedules.forward_args(step))   # teacher_temp for objectives with a teacher
    out["loss"].backward()                                # {"loss", "loss/inv", "loss/eq", "loss/inv.sim", ...}

loss = loss/inv + λ · loss/eq. The invariant objective runs the student pass (`encode`: the two
global views, and what else it needs); the equivariant part reads the two views' SplitOutputs and
may hand `joint` projections back for the objective's regularisers (SIE). λ is `lam`, read at every
forward: model.grad_ratio's controller (train/schedules.py) moves it in training.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.encoder import SplitEncoder
from model.invariant import encode_views
from pipeline.batch import Batch

# Parameters that weight decay should skip besides biases and norm weights (timm's and iBOT's convention).
NO_DECAY_NAMES = (
    "pos_embed",
    "cls_token",
    "reg_token",
    "dist_token",
    "step_embed",
    "view_embed",
    "mask_token",
)


class Composed(nn.Module):
    """encoder + invariant objective + equivariant part; forward(batch, teacher_temp=None) -> loss terms."""

    def __init__(self, cfg: ModelConfig, encoder: SplitEncoder, invariant: nn.Module, equivariant: nn.Module):
        super().__init__()
        self.cfg, self.lam = cfg, cfg.lam
        self.encoder, self.invariant, self.equivariant = encoder, invariant, equivariant

    @property
    def teacher(self):
        """The invariant objective's EMA teacher (model/teacher.py), or None."""
        return self.invariant.teacher

    def update_teacher(self, momentum: float) -> None:
        """After optimizer.step: the teacher (if any) follows the student."""
        if self.teacher is not None:
            self.invariant.update_teacher(self.encoder, momentum)

    def forward(
        self, batch: Batch, teacher_temp: tuple[float, float] | None = None
    ) -> dict[str, torch.Tensor]:
        views = self.invariant.encode(self.encoder, batch)
        eq, joint = self.equivariant(batch, views.o1, views.o2)
        out = self.invariant(self.encoder, batch, views, joint, teacher_temp)
        out.update(eq)
        out["loss"] = out["loss/inv"] + self.lam * out["loss/eq"]
        return out

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor | None:
        """Predicted images (B, K', 3, Ht, Wt) in the batch's normalisation, or None."""
        o1, o2, _ = encode_views(self.encoder, batch)
        return self.equivariant.reconstruct(batch, o1, o2)

    def targets(self, batch: Batch) -> torch.Tensor | None:
        """What reconstruct's images are scored against (the equivariant part's targets)."""
        return self.equivariant.targets(batch)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: biases, norms, embeddings, mask token."""
        return {
            n for n, p in self.named_parameters() if p.ndim <= 1 or n.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        }
