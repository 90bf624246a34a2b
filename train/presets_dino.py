"""The DINO family's presets (model.family dino | ibot | dinov2): the CPU demos on the embedded photos
and the `path` paper's settings (§Training settings). They register into train/config.py's PRESETS.

    demo-dino, demo-ibot, demo-dinov2      64 px, patch 8, path (conv decoder), 4 local crops of 32 px
    vits16-ibot, vits16-ibot-path          iBOT ViT-S/16, 800 epochs, batch 1024, lr 5e-4 x B / 256
    vitl16-ibot-path                       iBOT ViT-L/16, 250 epochs
    vitl16-dinov2, vitl16-dinov2-path      DINOv2 ViT-L/16, 100 epochs, batch 2048, 4e-3 x sqrt(B / 1024)
"""

from __future__ import annotations

import dataclasses

from model.config import DinoConfig
from pipeline.multicrop import MULTICROP, global_data_config
from train.config import Config, _demo_base, _only_views, _vits16_base, preset


def _dino_family(cfg: Config, family: str, local_size: int, n_local: int) -> None:
    """A DINO-family invariant loss: the recipe's multi-crop at the preset's sizes, class-token pooling,
    the recipe's teacher (momentum, temperatures) and weight decay 0.04 -> 0.4; data = the global crops."""
    cfg.model.family, cfg.model.pool = family, "cls"
    mc = dataclasses.replace(
        MULTICROP[family],
        global_size=cfg.data.img_size,
        local_size=local_size,
        n_local=n_local,
        patch_size=cfg.model.patch_size,
    )
    cfg.data = global_data_config(cfg.data, mc)
    dinov2 = family == "dinov2"
    cfg.model.dino = DinoConfig(
        out_dim=65536 if dinov2 else 8192, norm_last_layer=False, momentum=0.992 if dinov2 else 0.996
    )
    cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad = 0.04, 0.4, 3.0


def _demo_dino_family(cfg: Config, family: str) -> None:
    """The demo (64 px, patch 8, `path` with the conv decoder) with a DINO family: 4 local crops of 32 px,
    a tiny head (1024 prototypes, hidden 256, bottleneck 64)."""
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "conv"
    _dino_family(cfg, family, local_size=32, n_local=4)
    cfg.model.dino = dataclasses.replace(cfg.model.dino, out_dim=1024, hidden_dim=256, bottleneck_dim=64)
    cfg.optim.base_lr = 5e-4


@preset("demo-dino")
def _demo_dino(cfg: Config) -> None:
    """DINO + path on the embedded photos (CPU, minutes): 2 global crops of 64 px, 4 local of 32 px."""
    _demo_dino_family(cfg, "dino")


@preset("demo-ibot")
def _demo_ibot(cfg: Config) -> None:
    """iBOT + path on the embedded photos (CPU, minutes): block-masked global crops, shared head."""
    _demo_dino_family(cfg, "ibot")


@preset("demo-dinov2")
def _demo_dinov2(cfg: Config) -> None:
    """DINOv2 + path on the embedded photos (CPU, minutes): Sinkhorn-Knopp, KoLeo, layer-wise lr decay."""
    _demo_dino_family(cfg, "dinov2")
    cfg.optim.layer_decay, cfg.optim.patch_embed_lr = 0.9, 0.2


def _ibot_paper(cfg: Config, backbone: str, epochs: float, drop_path: float, path: bool) -> None:
    """iBOT as the path paper trains it (§Training settings): batch 1024, lr 5e-4 * B / 256, 10 warm-up
    epochs, 2 global crops of 224 (scale 0.25-1) + 10 local of 96 (0.05-0.25), 8192 prototypes; with
    path, d_patch 8192 = 6144 z_inv + 2048 z_eq and the paper's conv decoder."""
    _vits16_base(cfg)
    cfg.data.batch_size = 1024
    cfg.model.backbone, cfg.model.drop_path = backbone, drop_path
    cfg.model.method, cfg.model.decoder = ("path", "conv") if path else ("vicreg", "conv")
    cfg.model.d_patch, cfg.model.d_inv = 8192, 6144
    if not path:
        _only_views(cfg)
    _dino_family(cfg, "ibot", local_size=96, n_local=10)
    cfg.optim = dataclasses.replace(cfg.optim, base_lr=5e-4, epochs=epochs, warmup_epochs=10.0, min_lr=1e-6)


def _dinov2_paper(cfg: Config, path: bool) -> None:
    """DINOv2 ViT-L/16 as the path paper trains it: batch 2048, 100 epochs, base lr 4e-3 scaled by
    sqrt(B / 1024) as DINOv2 does, 10 warm-up epochs, layer-wise decay 0.9, patch-embed lr x 0.2,
    drop-path 0.4, 65536 prototypes, 2 global crops (0.32-1) + 8 local (0.05-0.32); with path,
    d_patch 2048 = 1536 z_inv + 512 z_eq."""
    _vits16_base(cfg)
    cfg.model.backbone, cfg.model.drop_path = "vit_large_patch16_224", 0.4
    cfg.model.method, cfg.model.decoder = ("path", "conv") if path else ("vicreg", "conv")
    cfg.model.d_patch, cfg.model.d_inv = 2048, 1536
    if not path:
        _only_views(cfg)
    _dino_family(cfg, "dinov2", local_size=96, n_local=8)
    cfg.optim = dataclasses.replace(
        cfg.optim,
        base_lr=4e-3,
        lr_scaling="sqrt",
        epochs=100.0,
        warmup_epochs=10.0,
        min_lr=1e-6,
        layer_decay=0.9,
        patch_embed_lr=0.2,
    )


@preset("vits16-ibot")
def _vits16_ibot(cfg: Config) -> None:
    """iBOT ViT-S/16, 800 epochs (needs CUDA): the baseline of the path paper's iBOT rows."""
    _ibot_paper(cfg, "vit_small_patch16_224", 800.0, 0.1, path=False)


@preset("vits16-ibot-path")
def _vits16_ibot_path(cfg: Config) -> None:
    """iBOT + path ViT-S/16, 800 epochs (needs CUDA)."""
    _ibot_paper(cfg, "vit_small_patch16_224", 800.0, 0.1, path=True)


@preset("vitl16-ibot-path")
def _vitl16_ibot_path(cfg: Config) -> None:
    """iBOT + path ViT-L/16, 250 epochs (needs CUDA; --dist.strategy=fsdp for memory)."""
    _ibot_paper(cfg, "vit_large_patch16_224", 250.0, 0.4, path=True)


@preset("vitl16-dinov2")
def _vitl16_dinov2(cfg: Config) -> None:
    """DINOv2 ViT-L/16, 100 epochs (needs CUDA; --dist.strategy=fsdp for memory)."""
    _dinov2_paper(cfg, path=False)


@preset("vitl16-dinov2-path")
def _vitl16_dinov2_path(cfg: Config) -> None:
    """DINOv2 + path ViT-L/16, 100 epochs (needs CUDA; --dist.strategy=fsdp for memory)."""
    _dinov2_paper(cfg, path=True)
