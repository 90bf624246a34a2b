"""The DINO family (dino, ibot, dinov2) as an invariant objective (model/invariant.py's interface).

    objective = DinoObjective(cfg.model, cfg.data, encoder)      # cfg.model.family: dino | ibot | dinov2
    terms = objective(encoder, batch, views, None, teacher_temp=(0.04, 0.04))   # this step's temperatures
    objective.update_teacher(encoder, teacher_momentum(step, total, 0.996))     # after optimizer.step

loss/inv = dino + w_ibot · ibot (ibot, dinov2) + w_koleo · koleo (dinov2); the logged terms are
unweighted. The losses, heads and the choices the `path` paper leaves open are in model/dino.py's
docstring; the temperatures and the momentum are schedules (train/schedules.py), passed in. Per family:

| family | teacher targets                            | student crops                               |
| ------ | ------------------------------------------ | ------------------------------------------- |
| dino   | centred softmax (EMA centre 0.9)           | 2 global + L local                          |
| ibot   | centred softmax, separate patch centre     | 2 global (block-masked) + L local           |
| dinov2 | Sinkhorn-Knopp (cls and masked patches)    | 2 global (block-masked) + L local; + KoLeo  |

iBOT's patch centre is the mean over all the teacher's patch tokens (its head runs on all of them, as
iBOT does); DINOv2 runs the teacher head on the masked patches only.

The batch: view1 and view2 are the two global crops (the path g_θ and its targets act on view2), and
the family reads the Batch's multi-crop fields (pipeline/batch.py): `local` (B, L, 3, h, w) local
crops, None or L = 0 for none, and `masks` (B, 2, N) bool, iBOT's masks of the two global crops' N
patch tokens (pipeline/masks.py). The encoder applies its mask token and takes the local crops' size
(SplitEncoder.forward(x, masks)).
"""

from __future__ import annotations

import torch
from torch import nn

from model import dino
from model.config import ModelConfig
from model.encoder import SplitEncoder
from model.invariant import Views, encode_views
from model.teacher import EMATeacher
from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError

FAMILIES = ("dino", "ibot", "dinov2")


class DinoObjective(nn.Module):
    """A DINO-family loss on z_inv, with its head and its EMA teacher (a copy of encoder + head)."""

    # Built after the equivariant part: the init order of the recorded runs
    # (tests/train/first_losses.json), and the teacher copies the finished student.
    after_equivariant = True

    def __init__(self, cfg: ModelConfig, data: DataConfig, encoder: SplitEncoder):
        super().__init__()
        if cfg.family not in FAMILIES:
            raise ConfigError(f"unknown DINO family {cfg.family!r}; choose from {', '.join(FAMILIES)}")
        self.family, self.knobs = cfg.family, cfg.dino
        d = cfg.dino
        self.head = dino.DINOHead(
            encoder.d_inv, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers, d.norm_last_layer
        )
        self.masked = cfg.family in ("ibot", "dinov2")
        if self.masked:
            encoder.add_mask_token()
        self.teacher = EMATeacher(self._student(encoder))
        self.register_buffer("center", torch.zeros(d.out_dim))
        self.register_buffer("patch_center", torch.zeros(d.out_dim))

    def _student(self, encoder: SplitEncoder) -> nn.ModuleDict:
        """The modules the teacher copies and follows (not registered here: they are registered already)."""
        return nn.ModuleDict({"encoder": encoder, "head": self.head})

    @torch.no_grad()
    def update_teacher(self, encoder: SplitEncoder, momentum: float) -> None:
        self.teacher.update(self._student(encoder), momentum)

    def _check(self, encoder: SplitEncoder, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(local crops or None, masks (2B, N) in the views' order or None), checked."""
        b = len(batch)
        local, masks = batch.local, batch.masks
        if local is not None and (local.dim() != 5 or local.shape[0] != b or local.shape[2] != 3):
            raise ValueError(f"batch.local has shape {tuple(local.shape)}, expected (B={b}, L, 3, h, w)")
        if local is not None and local.shape[1] == 0:
            local = None
        if not self.masked:
            return local, None
        want = (b, 2, encoder.num_patches)
        if masks is None or tuple(masks.shape) != want or masks.dtype != torch.bool:
            got = None if masks is None else (tuple(masks.shape), masks.dtype)
            raise ConfigError(
                f"the {self.family} family needs batch.masks, bool {want} (iBOT's masks of the two "
                f"global crops), got {got}: the loader must make them"
            )
        return local, masks.transpose(0, 1).flatten(0, 1)  # (2B, N), view-major like the views

    def encode(self, encoder: SplitEncoder, batch: Batch) -> Views:
        """The student's global views (masked) and, in `extra`, (local crops, masks)."""
        local, masks = self._check(encoder, batch)
        views = encode_views(encoder, batch, masks)
        return views._replace(extra=(local, masks))

    @torch.no_grad()
    def _teacher_targets(
        self, views: torch.Tensor, masks: torch.Tensor | None, temps: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets for the global crops: (2B, K) for the class token, (M, K) for the masked patches."""
        out = self.teacher.module["encoder"](views)
        head = self.teacher.module["head"]
        cls_logits = head(out.z_inv)  # (2B, K)
        patch_targets = None
        if self.family == "dinov2":
            cls_targets = dino.sinkhorn_knopp(cls_logits, temps[0])
            if masks is not None:
                patch_targets = dino.sinkhorn_knopp(head(out.z_inv_tokens[masks]), temps[1])
        else:
            momentum = self.knobs.center_momentum
            cls_targets = dino.teacher_softmax(cls_logits, self.center, temps[0])
            self.center.copy_(dino.update_center(self.center, cls_logits, momentum))
            if masks is not None:
                patch_logits = head(out.z_inv_tokens)  # (2B, N, K): iBOT centres over every patch
                patch_targets = dino.teacher_softmax(patch_logits[masks], self.patch_center, temps[1])
                self.patch_center.copy_(dino.update_center(self.patch_center, patch_logits.mean(1), momentum))
        return cls_targets, patch_targets

    def forward(
        self,
        encoder: SplitEncoder,
        batch: Batch,
        views: Views,
        joint=None,
        teacher_temp: tuple[float, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """teacher_temp: (class token, patches), this step's values of the schedule (required)."""
        if teacher_temp is None:
            raise ValueError(
                f"the {self.family} family needs this step's teacher temperatures: "
                f"method(batch, teacher_temp=(cls, patch)) (train/schedules.py's forward_args)"
            )
        local, masks = views.extra
        knobs, b = self.knobs, len(batch)
        cls_targets, patch_targets = self._teacher_targets(
            torch.cat([batch.view1, batch.view2]), masks, teacher_temp
        )
        student = [views.o1, views.o2]
        pooled = [torch.cat([o.z_inv for o in student])]  # (2B, d_inv)
        if local is not None:  # local crops: one pass at their own size, crop-major like the globals
            pooled.append(encoder(local.transpose(0, 1).flatten(0, 1)).z_inv)
        logits = self.head(torch.cat(pooled)).view(-1, b, knobs.out_dim)  # (V, B, K)
        terms = {"dino": dino.dino_loss(logits, cls_targets.view(2, b, -1), knobs.student_temp)}
        loss = terms["dino"]
        if self.masked:
            tokens = torch.cat([o.z_inv_tokens for o in student])  # (2B, N, d_inv)
            patch_logits = self.head(tokens[masks])  # (M, K)
            terms["ibot"] = dino.ibot_patch_loss(patch_logits, patch_targets, masks, knobs.student_temp)
            loss = loss + knobs.ibot_weight * terms["ibot"]
        if self.family == "dinov2":  # per global crop: no KoLeo between two crops of one image
            terms["koleo"] = sum(dino.koleo_loss(o.z_inv) for o in student)
            loss = loss + knobs.koleo_weight * terms["koleo"]
        return {"loss/inv": loss, **{f"loss/inv.{k}": v.detach() for k, v in terms.items()}}
