"""What the probes embed with: a frozen backbone split like `model.encoder.SplitEncoder`, its
random-init twin, and raw pixels. Backbones are loaded by train/backbones.py (an export folder, a
training checkpoint, or timm:NAME[:WEIGHTS]).

    bb = train.backbones.load_backbone("runs/demo/backbone")     # or RUN/ckpt/last.pt, or timm:vit_small_patch16_224:w.pth
    emb = Embedder.from_backbone(bb, pool="grid2")
    feats = embed(emb, images, batch_size=256, device=device)  # {part: (N, D)}

Parts: `all` = the backbone's tokens, pooled; `inv` / `eq` = the head's z_inv / z_eq channels (the
head runs on every token, then the same pooling: `model.encoder.pool_tokens` is the one rule).
`random_twin` re-initialises a deep copy with timm's own init, so the "no training" baseline has the
very same architecture, head and split. `PixelEmbedder` is the other baseline: the image itself,
area-downsampled to 16×16.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.encoder import PROBE_POOLS, pool_tokens
from pipeline.errors import ProbeError
from train.backbones import Backbone

PARTS = ("all", "inv", "eq")
PIXEL_SIZE = 16


class Embedder(nn.Module):
    """A frozen backbone (+ its split head): images (B, 3, S, S) in [0, 1] -> {part: (B, D)} pooled by
    `pool` (mean | cls | grid2 | tokens)."""

    def __init__(
        self,
        model: nn.Module,
        head: nn.Linear | None,
        d_inv: int,
        pool: str,
        mean,
        std,
        num_prefix_tokens: int,
    ):
        super().__init__()
        if pool not in PROBE_POOLS:
            raise ProbeError(f"--pool must be one of {', '.join(PROBE_POOLS)}, got {pool!r}")
        if pool == "cls" and not getattr(model, "has_class_token", False):
            raise ProbeError("--pool cls: this backbone has no class token; use --pool mean")
        self.model, self.head, self.d_inv, self.pool = model.eval(), head, d_inv, pool
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if head is None:
            self.parts: tuple[str, ...] = ("all",)
        else:
            self.parts = ("all", "inv") if d_inv >= head.out_features else PARTS

    def check_pools(self, pools: tuple[str, ...]) -> None:
        """ProbeError unless every pooling applies to this backbone's tokens."""
        for pool in pools:
            if pool not in PROBE_POOLS:
                raise ProbeError(f"--pool {pool!r}: choose from {', '.join(PROBE_POOLS)}")
            if pool == "cls" and not getattr(self.model, "has_class_token", False):
                raise ProbeError("--pool cls: this backbone has no class token; use --pool mean")
            grid = tuple(getattr(self.model.patch_embed, "grid_size", (0, 0)))
            if pool == "grid2" and (grid[0] != grid[1] or grid[0] % 2):
                raise ProbeError(
                    f"--pool grid2 needs an even square token grid; this backbone gives {grid[0]}x{grid[1]} "
                    f"at this image size (use --pool tokens, or an --img-size of an even number of patches)"
                )

    @classmethod
    def from_backbone(cls, bb: Backbone, pool: str = "mean") -> Embedder:
        return cls(bb.model, bb.head, bb.d_inv, pool, bb.mean, bb.std, bb.num_prefix_tokens)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pooled(x, (self.pool,))[self.pool]

    @torch.no_grad()
    def pooled(self, x: torch.Tensor, pools: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """One forward pass, every pooling: (B, 3, S, S) -> {pool: {part: (B, D_pool)}}."""
        tokens = self.model.forward_features((x - self.mean) / self.std)  # (B, prefix + N, C)
        by_part = {"all": tokens}
        if self.head is not None:
            z = self.head(tokens)  # (B, prefix + N, d_patch)
            by_part["inv"] = z[..., : self.d_inv]
            if "eq" in self.parts:
                by_part["eq"] = z[..., self.d_inv :]
        return {
            pool: {p: pool_tokens(by_part[p], self.num_prefix_tokens, pool) for p in self.parts}
            for pool in pools
        }


def random_twin(emb: Embedder, seed: int = 0) -> Embedder:
    """The same architecture, head and split, re-initialised (timm's init_weights where it has one)."""
    twin = copy.deepcopy(emb)
    torch.manual_seed(seed)
    for module in twin.modules():
        if module is not twin and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if hasattr(twin.model, "init_weights"):
        twin.model.init_weights()
    return twin.eval()


class PixelEmbedder(nn.Module):
    """The raw-pixel baseline: (B, 3, S, S) -> {"all": (B, 3·16·16)}, area-downsampled."""

    parts = ("all",)
    pool_free = True  # the same features whatever the pooling: probes fit it once per pair set

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"all": F.adaptive_avg_pool2d(x.float(), PIXEL_SIZE).flatten(1)}

    def pooled(self, x: torch.Tensor, pools: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        feats = self(x)
        return {pool: feats for pool in pools}


def embed(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, bar=None) -> dict:
    """model on `images` (N, 3, S, S) in batches -> {part: (N, D) float32 on the CPU}."""
    out: dict[str, list] = {}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device, non_blocking=True).float()
            for part, f in model(chunk).items():
                out.setdefault(part, []).append(f.float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    return {part: torch.cat(f) for part, f in out.items()}


def embed_pools(
    model: nn.Module, images: torch.Tensor, pools: tuple[str, ...], batch_size: int, device, bar=None
) -> dict[str, dict[str, torch.Tensor]]:
    """`model.pooled` on `images` (N, 3, S, S) in batches, one forward pass per image for every
    pooling -> {pool: {part: (N, D) float32 on the CPU}}."""
    out: dict[str, dict[str, list]] = {}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device, non_blocking=True).float()
            # a model without `pooled` (a plain {part: features} module) is the same for every pool
            pooled = (
                model.pooled(chunk, pools) if hasattr(model, "pooled") else dict.fromkeys(pools, model(chunk))
            )
            for pool, by_part in pooled.items():
                for part, f in by_part.items():
                    out.setdefault(pool, {}).setdefault(part, []).append(f.float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    return {pool: {part: torch.cat(f) for part, f in by_part.items()} for pool, by_part in out.items()}
