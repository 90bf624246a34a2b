"""The DINO family (dino, ibot, dinov2) as the invariant part of a Method, combined with any
equivariant part of model/methods.py (none, sie, xattn, path).

    method = DinoFamily(cfg.model, cfg.data, DinoConfig(family="ibot"), equivariant="path")
    method.set_temperatures(teacher=0.04, patch=0.04)   # the schedule's values for this step
    out = method(batch)     # {"loss", "loss/inv", "loss/inv.dino", "loss/inv.ibot", "loss/inv.koleo", "loss/eq", ...}
    out["loss"].backward(); optimizer.step()
    method.update_teacher(teacher_momentum(step, total, 0.996))

loss = loss/inv + λ · loss/eq, with loss/inv = dino + w_ibot · ibot (ibot, dinov2) + w_koleo · koleo
(dinov2); the logged terms are unweighted. The losses, heads and the choices the `path` paper leaves
open are in model/dino.py's docstring. Per family:

| family | teacher targets                            | student crops                               |
| ------ | ------------------------------------------ | ------------------------------------------- |
| dino   | centred softmax (EMA centre 0.9)           | 2 global + L local                          |
| ibot   | centred softmax, separate patch centre     | 2 global (block-masked) + L local           |
| dinov2 | Sinkhorn-Knopp (cls and masked patches)    | 2 global (block-masked) + L local; + KoLeo  |

iBOT's patch centre is the mean over all the teacher's patch tokens (its head runs on all of them, as
iBOT does); DINOv2 runs the teacher head on the masked patches only.

The batch: view1 and view2 are the two global crops (the path g_θ and its targets act on view2), and
the DINO family reads the Batch's multi-crop fields (pipeline/batch.py): `local` (B, L, 3, h, w) local
crops, None or L = 0 for none, and `masks` (B, 2, N) bool, iBOT's masks of the two global crops' N
patch tokens (pipeline/masks.py).

The student runs the global crops (masked) and the local crops (at their own size, position
embedding resampled) through the encoder's timm ViT by `encode_tokens` below, an adapter: timm's
VisionTransformer has neither mask tokens nor (as SplitEncoder builds it) other input sizes.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from model import dino
from model.config import DinoConfig, ModelConfig
from model.encoder import SplitEncoder, SplitOutput
from model.methods import METHODS, NO_DECAY_NAMES, VICReg
from model.teacher import EMATeacher
from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError

FAMILIES = ("dino", "ibot", "dinov2")  # model.config.FAMILIES without vicreg
# Equivariant part -> the model/methods.py method that provides it ("none": VICReg's, which adds nothing).
EQUIVARIANT = {"none": "vicreg", "sie": "sie", "xattn": "xattn", "path": "path"}


def encode_tokens(
    encoder: SplitEncoder,
    x: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> SplitOutput:
    """SplitEncoder.forward with iBOT's mask tokens and any input size (a multiple of the patch).

    x (B, 3, H, W); masks (B, N) bool replaces those patch embeddings by mask_token (1, 1, D) before
    the position embedding, as iBOT and DINOv2 do. Equals encoder(x) without masks at the encoder's
    size (tested), by the steps of timm's VisionTransformer.forward_features.
    """
    vit = encoder.backbone
    patch = vit.patch_embed.patch_size
    if x.dim() != 4 or x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
        raise ValueError(
            f"crops of shape {tuple(x.shape)}: the encoder needs (B, 3, H, W) with H and W "
            f"multiples of model.patch_size={patch[0]}"
        )
    tokens = vit.patch_embed.proj(x)  # (B, D, gh, gw)
    grid = tuple(tokens.shape[-2:])
    tokens = vit.patch_embed.norm(tokens.flatten(2).transpose(1, 2))  # (B, N, D)
    if masks is not None:
        tokens = torch.where(masks[..., None], mask_token.to(tokens.dtype), tokens)
    n_prefix = vit.num_prefix_tokens
    pos = vit.pos_embed
    if grid != tuple(vit.patch_embed.grid_size):
        pos = resample_abs_pos_embed(
            pos,
            new_size=grid,
            old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=0 if vit.no_embed_class else n_prefix,
        )
    prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:
        tokens = torch.cat([*prefix, tokens + pos], dim=1)
    else:
        tokens = torch.cat([*prefix, tokens], dim=1) + pos
    tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
    tokens = vit.norm(vit.blocks(tokens))  # (B, prefix + N, D)
    # The head and the split, as SplitEncoder.forward does them.
    if encoder.pool == "cls":
        z = encoder.head(tokens)
        pooled, z = z[:, 0], z[:, n_prefix:]
    else:
        z = encoder.head(tokens[:, n_prefix:])
        pooled = z.mean(dim=1)
    d = encoder.d_inv
    return SplitOutput(
        z_inv_tokens=z[..., :d], z_eq=z[..., d:], z_inv=pooled[:, :d], z_eq_pooled=pooled[:, d:]
    )


class DinoFamily(nn.Module):
    """A DINO-family invariant loss on z_inv + the equivariant part of a model/methods.py method."""

    def __init__(self, cfg: ModelConfig, data: DataConfig, family: DinoConfig, equivariant: str = "path"):
        super().__init__()
        if family.family not in FAMILIES:
            raise ConfigError(f"unknown DINO family {family.family!r}; choose from {', '.join(FAMILIES)}")
        if equivariant not in EQUIVARIANT:
            raise ConfigError(
                f"unknown equivariant part {equivariant!r}; choose from {', '.join(EQUIVARIANT)}"
            )
        self.cfg, self.family = cfg, family
        self.lam = cfg.lam  # as VICReg.lam: the controller of model.grad_ratio moves it
        # The equivariant method owns the encoder and its decoder/predictor; its VICReg expander is
        # dropped (the family has its own head), so that no parameter is left without a gradient.
        # (VICReg is every method's base class.)
        self.eq: VICReg = METHODS[EQUIVARIANT[equivariant]](dataclasses.replace(cfg, expander=()), data)
        enc = self.eq.encoder
        self.head = dino.DINOHead(
            enc.d_inv,
            family.out_dim,
            family.hidden_dim,
            family.bottleneck_dim,
            family.nlayers,
            family.norm_last_layer,
        )
        self.masked = family.family in ("ibot", "dinov2")
        if self.masked:  # iBOT's learned embedding of a masked patch (zeros at init, as iBOT and DINOv2)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.teacher = EMATeacher(self._student())
        self.register_buffer("center", torch.zeros(family.out_dim))
        self.register_buffer("patch_center", torch.zeros(family.out_dim))
        self.teacher_temp = self.patch_temp = 0.04  # warm-up start; the trainer sets each step's values

    @property
    def encoder(self) -> SplitEncoder:
        return self.eq.encoder

    def _student(self) -> nn.ModuleDict:
        """The modules the teacher copies and follows (not registered: they are registered already)."""
        return nn.ModuleDict({"encoder": self.encoder, "head": self.head})

    def set_temperatures(self, teacher: float, patch: float | None = None) -> None:
        """This step's teacher temperatures (class token, patches); the schedule lives in the trainer."""
        self.teacher_temp = teacher
        self.patch_temp = teacher if patch is None else patch

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        self.teacher.update(self._student(), momentum)

    def _check(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b, s = len(batch), self.eq.img_size
        for name in ("view1", "view2"):
            shape = tuple(getattr(batch, name).shape)
            if shape != (b, 3, s, s):
                raise ValueError(
                    f"batch.{name} has shape {shape}, the model expects ({b}, 3, {s}, {s}) (data.img_size)"
                )
        local, masks = batch.local, batch.masks
        if local is not None and (local.dim() != 5 or local.shape[0] != b or local.shape[2] != 3):
            raise ValueError(f"batch.local has shape {tuple(local.shape)}, expected (B={b}, L, 3, h, w)")
        if local is not None and local.shape[1] == 0:
            local = None
        if self.masked:
            want = (b, 2, self.encoder.num_patches)
            if masks is None or tuple(masks.shape) != want or masks.dtype != torch.bool:
                got = None if masks is None else (tuple(masks.shape), masks.dtype)
                raise ConfigError(
                    f"the {self.family.family} family needs batch.masks, bool {want} (iBOT's masks "
                    f"of the two global crops), got {got}: the loader must make them"
                )
        return local, masks

    @torch.no_grad()
    def _teacher_targets(
        self, views: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets for the global crops: (2B, K) for the class token, (M, K) for the masked patches."""
        fam = self.family
        out = encode_tokens(self.teacher.module["encoder"], views)
        head = self.teacher.module["head"]
        cls_logits = head(out.z_inv)  # (2B, K)
        patch_targets = None
        if fam.family == "dinov2":
            cls_targets = dino.sinkhorn_knopp(cls_logits, self.teacher_temp)
            if masks is not None:
                patch_targets = dino.sinkhorn_knopp(head(out.z_inv_tokens[masks]), self.patch_temp)
        else:
            cls_targets = dino.teacher_softmax(cls_logits, self.center, self.teacher_temp)
            self.center.copy_(dino.update_center(self.center, cls_logits, fam.center_momentum))
            if masks is not None:
                patch_logits = head(out.z_inv_tokens)  # (2B, N, K): iBOT centres over every patch
                patch_targets = dino.teacher_softmax(patch_logits[masks], self.patch_center, self.patch_temp)
                self.patch_center.copy_(
                    dino.update_center(self.patch_center, patch_logits.mean(1), fam.center_momentum)
                )
        return cls_targets, patch_targets

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        local, masks = self._check(batch)
        fam, b = self.family, len(batch)
        views = torch.cat([batch.view1, batch.view2])  # (2B, 3, H, W), crop-major
        flat_masks = masks.transpose(0, 1).flatten(0, 1) if self.masked else None  # (2B, N) in the same order
        cls_targets, patch_targets = self._teacher_targets(views, flat_masks)

        student = encode_tokens(self.encoder, views, flat_masks, getattr(self, "mask_token", None))
        pooled = [student.z_inv]  # (2B, d_inv)
        if local is not None:  # local crops: one pass at their own size, crop-major like the globals
            pooled.append(encode_tokens(self.encoder, local.transpose(0, 1).flatten(0, 1)).z_inv)
        logits = self.head(torch.cat(pooled)).view(-1, b, fam.out_dim)  # (V, B, K)
        terms = {"dino": dino.dino_loss(logits, cls_targets.view(2, b, -1), fam.student_temp)}
        loss = terms["dino"]
        if self.masked:
            patch_logits = self.head(student.z_inv_tokens[flat_masks])  # (M, K)
            terms["ibot"] = dino.ibot_patch_loss(patch_logits, patch_targets, flat_masks, fam.student_temp)
            loss = loss + fam.ibot_weight * terms["ibot"]
        if fam.family == "dinov2":  # per global crop: no KoLeo between two crops of one image
            terms["koleo"] = sum(dino.koleo_loss(z) for z in student.z_inv.chunk(2))
            loss = loss + fam.koleo_weight * terms["koleo"]

        out = {"loss/inv": loss, **{f"loss/inv.{k}": v.detach() for k, v in terms.items()}}
        halves = [t.chunk(2) for t in student]
        o1, o2 = SplitOutput(*(h[0] for h in halves)), SplitOutput(*(h[1] for h in halves))
        out.update(self.eq.equivariance(batch, o1, o2))
        out["loss"] = out["loss/inv"] + self.lam * out["loss/eq"]
        return out

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> torch.Tensor | None:
        return self.eq.reconstruct(batch)

    def targets(self, batch: Batch) -> torch.Tensor:
        """What reconstruct's images are scored against (the equivariant part's targets)."""
        return self.eq.targets(batch)

    def no_weight_decay(self) -> set[str]:
        """Biases, norms, embeddings and the mask token (timm's and iBOT's convention)."""
        names = (*NO_DECAY_NAMES, "mask_token")
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.rsplit(".", 1)[-1] in names}
