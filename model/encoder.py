"""The split encoder shared by every method: a timm ViT, a linear head on its tokens, z = [z_inv | z_eq].

`backbone` is a plain timm model (export saves `backbone.state_dict()` with timm's keys and
`timm.create_model(encoder.timm_name, **encoder.timm_kwargs)` recreates it); `head` maps every token
to `d_patch` channels. The first `d_inv` channels are the invariant part, pooled for the SSL loss;
the remaining `d_eq = d_patch - d_inv` channels of the patch tokens are the equivariant tokens.

    out = encoder(x)                 # x (B, 3, H, W) at img_size: timm's forward_features, then the head
    out = encoder(x, masks)          # masks (B, N) bool: those patches replaced by the mask token
    out = encoder(local_crops)       # any size that is a multiple of the patch: position embedding resampled

The mask token (iBOT's learned embedding of a masked patch, zeros at init) exists once an objective
asks for it (`add_mask_token`); masks and other sizes take DINOv2's `prepare_tokens_with_masks` path
through timm's modules, which equals forward_features at img_size without masks (tested).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from model.config import ModelConfig
from pipeline.errors import ConfigError

POOLS = ("mean", "cls")  # for the SSL loss
PROBE_POOLS = ("mean", "cls", "grid2", "tokens")  # for probes of frozen features


def pool_tokens(tokens: torch.Tensor, n_prefix: int, pool: str) -> torch.Tensor:
    """The pooling rule of the encoder and its probes: (B, prefix + N, C) -> (B, D).

    mean   the mean of the N patch tokens (D = C)
    cls    the class token (D = C)
    grid2  the means of the 2×2 quadrants of the token grid, concatenated (D = 4C): keeps where
           things are, which a global mean loses (e.g. the sign of a rotation)
    tokens every patch token, flattened (D = N·C): nothing pooled away
    """
    patches = tokens[:, n_prefix:]  # (B, N, C)
    if pool == "mean":
        return patches.mean(dim=1)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "tokens":
        return patches.flatten(1)
    if pool == "grid2":
        b, n, c = patches.shape
        g = math.isqrt(n)
        if g * g != n or g % 2:
            raise ValueError(f"pool 'grid2' needs an even square token grid, got {n} tokens")
        quads = patches.reshape(b, 2, g // 2, 2, g // 2, c).mean(dim=(2, 4))  # (B, 2, 2, C)
        return quads.flatten(1)
    raise ValueError(f"unknown pool {pool!r}; choose from {', '.join(PROBE_POOLS)}")


class SplitOutput(NamedTuple):
    """What `SplitEncoder.forward` returns (N = patch tokens, prefix tokens excluded)."""

    z_inv_tokens: torch.Tensor  # (B, N, d_inv)
    z_eq: torch.Tensor  # (B, N, d_eq); d_eq = 0 when everything is invariant
    z_inv: torch.Tensor  # (B, d_inv), pooled by cfg.pool
    z_eq_pooled: torch.Tensor  # (B, d_eq), pooled the same way


class SplitEncoder(nn.Module):
    """timm ViT + linear head, split channel-wise into an invariant and an equivariant part.

    all_invariant=True (the vicreg method) makes d_inv = d_patch and d_eq = 0.
    """

    def __init__(self, cfg: ModelConfig, img_size: int, all_invariant: bool = False):
        super().__init__()
        check_encoder_config(cfg, img_size, all_invariant)
        self.timm_name = cfg.backbone
        self.timm_kwargs = {"img_size": img_size, "patch_size": cfg.patch_size, "num_classes": 0}
        if cfg.depth:
            self.timm_kwargs["depth"] = cfg.depth
        try:
            self.backbone = timm.create_model(
                cfg.backbone, pretrained=False, drop_path_rate=cfg.drop_path, **self.timm_kwargs
            )
        except RuntimeError as err:  # timm's "Unknown model (...)"
            raise ConfigError(f"model.backbone={cfg.backbone!r}: timm cannot create it ({err})") from None
        except TypeError as err:  # a non-ViT model that takes no img_size / patch_size / depth
            raise ConfigError(
                f"model.backbone={cfg.backbone!r} is not a timm VisionTransformer ({err})"
            ) from None
        if not hasattr(self.backbone, "num_prefix_tokens") or not hasattr(self.backbone, "patch_embed"):
            raise ConfigError(f"model.backbone={cfg.backbone!r} is not a timm VisionTransformer")
        if cfg.pool == "cls" and not getattr(self.backbone, "has_class_token", False):
            raise ConfigError(
                f"model.pool='cls' but {cfg.backbone!r} has no class token; use model.pool=mean"
            )
        self.pool = cfg.pool
        self.d_patch = cfg.d_patch
        self.d_inv = cfg.d_patch if all_invariant else cfg.d_inv
        self.d_eq = cfg.d_patch - self.d_inv
        self.grid = img_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.embed_dim = self.backbone.embed_dim
        self.head = nn.Linear(self.embed_dim, cfg.d_patch)

        self.register_parameter("mask_token", None)  # add_mask_token

    def add_mask_token(self) -> None:
        """iBOT's learned mask embedding (1, 1, embed_dim), zeros at init (as iBOT and DINOv2)."""
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone tokens after the final norm: (B, 3, H, W) -> (B, prefix + N, embed_dim)."""
        vit = self.backbone
        if masks is None and tuple(x.shape[-2:]) == tuple(vit.patch_embed.img_size):
            return vit.forward_features(x)
        patch = vit.patch_embed.patch_size
        if x.dim() != 4 or x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
            raise ValueError(
                f"crops of shape {tuple(x.shape)}: the encoder needs (B, 3, H, W) with H and W "
                f"multiples of model.patch_size={patch[0]}"
            )
        if masks is not None and self.mask_token is None:
            raise ValueError("masks given, but the encoder has no mask token (add_mask_token)")
        # timm's forward_features step by step, with the mask token and a resampled position embedding.
        tokens = vit.patch_embed.proj(x)  # (B, D, gh, gw)
        grid = tuple(tokens.shape[-2:])
        tokens = vit.patch_embed.norm(tokens.flatten(2).transpose(1, 2))  # (B, N, D)
        if masks is not None:
            tokens = torch.where(masks[..., None], self.mask_token.to(tokens.dtype), tokens)
        n_prefix, pos = vit.num_prefix_tokens, vit.pos_embed
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
        return vit.norm(vit.blocks(tokens))  # (B, prefix + N, D)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> SplitOutput:
        """x (B, 3, H, W); masks (B, N) bool or None -> SplitOutput."""
        tokens = self.forward_features(x, masks)
        n_prefix = self.backbone.num_prefix_tokens
        if self.pool == "cls":
            z = self.head(tokens)  # (B, prefix + N, d_patch)
            pooled, z = pool_tokens(z, n_prefix, "cls"), z[:, n_prefix:]
        else:
            z = self.head(tokens[:, n_prefix:])  # (B, N, d_patch)
            pooled = pool_tokens(z, 0, "mean")
        return SplitOutput(
            z_inv_tokens=z[..., : self.d_inv],
            z_eq=z[..., self.d_inv :],
            z_inv=pooled[:, : self.d_inv],
            z_eq_pooled=pooled[:, self.d_inv :],
        )


def check_encoder_config(cfg: ModelConfig, img_size: int, all_invariant: bool) -> None:
    """One-line errors for sizes the encoder cannot take."""
    if cfg.patch_size <= 0 or img_size % cfg.patch_size:
        raise ConfigError(f"data.img_size={img_size} is not divisible by model.patch_size={cfg.patch_size}")
    if cfg.depth < 0:
        raise ConfigError(f"model.depth must be >= 0 (0 = the timm default), got {cfg.depth}")
    if cfg.pool not in POOLS:
        raise ConfigError(f"unknown model.pool {cfg.pool!r}; choose from {', '.join(POOLS)}")
    if cfg.d_patch <= 0:
        raise ConfigError(f"model.d_patch must be > 0, got {cfg.d_patch}")
    if not all_invariant and not 0 < cfg.d_inv < cfg.d_patch:
        raise ConfigError(
            f"model.d_inv={cfg.d_inv} must be in (0, model.d_patch={cfg.d_patch}) so that z_eq keeps "
            f"d_patch - d_inv > 0 channels"
        )
