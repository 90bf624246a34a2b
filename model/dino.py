"""The DINO family's parts: the DINO head, the DINO / iBOT / DINOv2 losses, teacher centring,
Sinkhorn-Knopp and KoLeo. Pure functions except the head. (iBOT's block masks are a data rule:
pipeline/masks.py.)

    t = teacher_softmax(teacher_logits, center, temp)          # DINO, iBOT (centre: update_center)
    t = sinkhorn_knopp(teacher_logits, temp)                   # DINOv2
    loss = dino_loss(student_logits, t.view(G, B, K))          # every (teacher crop, other crop) pair
    loss = ibot_patch_loss(student_masked, t_masked, masks)    # masked patch tokens only
    loss = koleo_loss(z)                                       # the caller applies the weight (0.1)

Shapes: G global crops, V ≥ G student crops (the G global crops first, in the teacher's order, then the
local ones), B images per rank, K prototypes, N patches per crop, M masked patches on this rank.
Each loss is the value on this rank's images; under DDP the averaged gradient is the gradient of the
global-batch loss (every rank holds the same number of images). What must see the global batch does:
`update_center` and `sinkhorn_knopp` all-reduce across ranks when a process group exists (no-ops
otherwise), so that their result on each rank equals the single-process result on the concatenated
batch. Tested against transcriptions of the official code (tests/model/oracles/).

Choices the `path` paper (arXiv 2503.18753) leaves open, made here and in model/dino_objective.py:
- The teacher is split too: it is an EMA copy of the whole student (SplitEncoder with its linear head,
  and the DINO head), so its head sees the same `z_inv` channels as the student's. Its `z_eq` is
  never used.
- Reconstruction uses student features only: the decoder reads the student's `z_eq` of the two global
  crops (DINO family: from the same student pass that the iBOT loss uses, so the second global crop is
  seen with its iBOT mask; no extra encoder pass).
- Only `z_inv` feeds the family's terms: the DINO loss takes the pooled `z_inv` of every crop (pooled
  by model.pool; `cls`, the class token, is DINO's choice), the iBOT loss the `z_inv` tokens of the
  masked patches through the same (shared) head, KoLeo the pooled `z_inv` of each global crop (DINOv2
  applies it to the backbone's class token; `z_inv` is the closest analogue in a split encoder).
  `z_eq` sees only the reconstruction loss.

Numerics: softmax statistics run in at least fp32 outside autocast (float64 stays float64, for tests).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.errors import ConfigError

STUDENT_TEMP = 0.1  # DINO / iBOT / DINOv2 student temperature
CENTER_MOMENTUM = 0.9  # EMA of the teacher centre (DINO, iBOT)
SINKHORN_ITERATIONS = 3  # DINOv2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """x reduced in place over all ranks (nothing without a process group); returns x."""
    if _distributed():
        dist.all_reduce(x, op=op)
    return x


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class DINOHead(nn.Module):
    """DINO's projection head: MLP (in -> hidden -> ... -> bottleneck, GELU), L2 normalisation, then a
    weight-normalised linear layer to K prototypes without bias. (..., in_dim) -> (..., out_dim).

    norm_last_layer=True fixes the weight-norm gain g at 1 (DINO's and iBOT's default: the prototypes
    stay unit vectors, which bounds the logits by 1); False lets it train (DINOv2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers < 1 or min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ConfigError(
                f"DINOHead needs nlayers >= 1 and positive sizes, got nlayers={nlayers}, "
                f"in={in_dim}, hidden={hidden_dim}, bottleneck={bottleneck_dim}, out={out_dim}"
            )
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # DINO's init of the MLP; the last layer keeps nn.Linear's
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        gain.data.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # DINOv2's eps: 1e-12 underflows in fp16.
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


@torch.no_grad()
def teacher_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's centred, sharpened teacher targets: softmax((t - c) / temp). (..., K), c (K,) -> (..., K)."""
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        return F.softmax((_at_least_fp32(teacher_logits) - center) / temp, dim=-1)


@torch.no_grad()
def update_center(
    center: torch.Tensor, rows: torch.Tensor, momentum: float = CENTER_MOMENTUM
) -> torch.Tensor:
    """The EMA centre after one step: momentum · c + (1 - momentum) · mean of `rows` over all ranks.

    center (K,); rows (R, K): the teacher logits the centre averages (DINO: every global-crop class
    token; iBOT's patch centre: each crop's mean over its patch tokens). Ranks may hold different R.
    """
    rows = _at_least_fp32(rows)
    stats = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])  # (K + 1,): one all-reduce
    _all_reduce(stats)
    return center * momentum + stats[:-1] / stats[-1] * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temp: float, n_iterations: int = SINKHORN_ITERATIONS
) -> torch.Tensor:
    """DINOv2's teacher targets: Sinkhorn-Knopp on exp(t / temp) over the global batch. (R, K) -> (R, K).

    Alternately every prototype gets equal total mass over the rows of all ranks, and every row sums
    to 1; the result's rows sum to 1. Each normalisation is invariant to a global scale, so DINOv2's
    constant factors (1/ΣQ, 1/K, 1/B, ×B) are left out, and the logits are shifted by their global
    maximum first so that exp cannot overflow (DINOv2's prototype gain trains, its logits are
    unbounded). Ranks may hold different R (iBOT's masked patches).
    """
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        t = _at_least_fp32(teacher_logits)
        top = _all_reduce(t.max().reshape(1), dist.ReduceOp.MAX)
        q = torch.exp((t - top) / temp)  # (R, K)
        for _ in range(n_iterations):
            q = q / _all_reduce(q.sum(dim=0, keepdim=True))  # per prototype, over all ranks
            q = q / q.sum(dim=1, keepdim=True)  # per row
        return q


def dino_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float = STUDENT_TEMP
) -> torch.Tensor:
    """DINO's cross-entropy H(teacher crop g, student crop v), mean over images and over every pair
    v ≠ g. student_logits (V, B, K), the G global crops first in the teacher's order; teacher_probs
    (G, B, K) -> scalar. DINOv2's local and global terms are this average split in two sums."""
    g, b, _ = teacher_probs.shape
    v = student_logits.shape[0]
    if student_logits.shape[1:] != teacher_probs.shape[1:] or v < g or v < 2:
        raise ValueError(
            f"dino_loss: student logits {tuple(student_logits.shape)} must be (V >= G, B, K) for "
            f"teacher targets {tuple(teacher_probs.shape)} (G, B, K), with at least 2 crops"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(_at_least_fp32(student_logits) / student_temp, dim=-1)  # (V, B, K)
        ce = -torch.einsum("gbk,vbk->gv", teacher_probs.to(log_p.dtype), log_p) / b  # (G, V)
        other = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)  # a crop is not its own target
        return ce[other].mean()


def ibot_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """iBOT's masked-image-modelling loss: per crop, the mean cross-entropy over its masked patches,
    then the mean over crops (a crop without masked patches counts 0).

    student_logits, teacher_probs (M, K): the masked patch tokens in `masks.nonzero()` order (row-major,
    as `tokens[masks]` selects them); masks (C, N) bool, C crops of N patches, M = masks.sum().
    """
    m = int(masks.sum())
    if student_logits.shape != teacher_probs.shape or student_logits.shape[0] != m:
        raise ValueError(
            f"ibot_patch_loss: logits {tuple(student_logits.shape)} and targets "
            f"{tuple(teacher_probs.shape)} must both be (M, K) with M = {m} masked patches"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(_at_least_fp32(student_logits) / student_temp, dim=-1)  # (M, K)
        ce = -(teacher_probs.to(log_p.dtype) * log_p).sum(dim=-1)  # (M,)
        crop = masks.nonzero(as_tuple=True)[0]  # (M,) the crop of each masked patch
        per_crop = masks.sum(dim=1).clamp(min=1).to(ce.dtype)  # (C,)
        return (ce / per_crop[crop]).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2018), DINOv2's spreading regulariser: -mean log of each
    L2-normalised row's distance to its nearest other row (this rank's rows). x (B, D) -> scalar."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B, D) features with B >= 2, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(_at_least_fp32(x), dim=-1, eps=eps)
        with torch.no_grad():  # the neighbour is chosen, not differentiated
            sim = x @ x.T  # (B, B)
            sim.fill_diagonal_(-1.0)  # below any other cosine: a row is not its own neighbour
            nearest = sim.argmax(dim=1)  # (B,)
        return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()
