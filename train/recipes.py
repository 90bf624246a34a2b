"""Recipes: every named preset and how a config is loaded (defaults -> preset or saved file ->
`--section.field=value` overrides -> checks). It imports the config tree, never the reverse.

    cfg = load_config("demo", ["--model.lam=0.5", "--data.batch_size=64"])

    demo (default), demo-paper, demo-xattn-path, demo-vicreg, demo-sie, demo-xattn
        embedded photos, a tiny ViT at 64 px: minutes on a 2-core CPU
    vits16-{vicreg,sie,xattn,xattn-paper,path,path-paper,xattn-path}
        the papers' VICReg setting: ViT-S/16 at 224, batch 2048, 800 epochs (CUDA)
    demo-dino, demo-ibot, demo-dinov2      the DINO family at 64 px, patch 8, path, 4 local crops of 32 px
    vits16-ibot, vits16-ibot-path          iBOT ViT-S/16, 800 epochs, batch 1024, lr 5e-4 x B / 256
    vitl16-ibot-path                       iBOT ViT-L/16, 250 epochs
    vitl16-dinov2, vitl16-dinov2-path      DINOv2 ViT-L/16, 100 epochs, batch 2048, 4e-3 x sqrt(B / 1024)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from model.config import DinoConfig, ModelConfig
from pipeline.errors import ConfigError
from pipeline.multicrop import MULTICROP, global_data_config
from pipeline.path import PathConfig
from train.checks import check
from train.config import Config, OptimConfig, TeacherSchedule, from_dict, set_by_key

# --- presets: functions that edit a default Config ------------------------------------------------

PRESETS: dict[str, Callable[[Config], None]] = {}


def preset(name: str):
    def register(fn: Callable[[Config], None]) -> Callable[[Config], None]:
        PRESETS[name] = fn
        return fn

    return register


def _demo_base(cfg: Config) -> None:
    """Embedded photos, a tiny ViT at 64 px: a few minutes on a 2-core CPU."""
    cfg.data.dir = ""
    cfg.data.img_size = 64
    cfg.data.batch_size = 16
    cfg.data.workers = 2
    cfg.data.shuffle_buffer = 64
    cfg.data.aug = PathConfig(ref_size=224, k=2, crop_scale=(0.35, 1.0))
    cfg.model = ModelConfig(
        backbone="vit_tiny_patch16_224",
        patch_size=8,
        depth=4,
        d_patch=128,
        d_inv=64,
        dec_width=96,
        dec_depth=2,
        dec_heads=3,
        conv_width=64,
        expander=(256, 256),
    )
    # 64 train photos in batches of 16: 4 steps per epoch, 300 steps (~2-4 min on 2 cores); lr 3e-4.
    cfg.optim = OptimConfig(base_lr=5e-3, epochs=75.0, warmup_epochs=5.0, weight_decay=0.05)
    cfg.run.log_every = 5
    cfg.run.ckpt_every = 100
    cfg.run.recon_every = 100


def _vits16_base(cfg: Config) -> None:
    """The path paper's VICReg setting: ViT-S/16 at 224, d_patch 512 = 256 + 256, batch 2048, 800 epochs."""
    cfg.run.device = "cuda"  # a GPU preset: on a machine without one it stops with a clear error
    cfg.data.img_size = 224
    cfg.data.batch_size = 2048
    cfg.data.workers = 8
    cfg.data.aug = PathConfig(k=2)
    cfg.model = ModelConfig(backbone="vit_small_patch16_224", patch_size=16, d_patch=512, d_inv=256, lam=1.0)
    cfg.optim = OptimConfig(base_lr=1e-4, epochs=800.0, warmup_epochs=10.0)


def _only_views(cfg: Config) -> None:
    """Methods that reconstruct nothing along the path need no intermediate targets."""
    cfg.data.aug.k = 0


def _sie(cfg: Config) -> None:
    """SIE with its official loss weights: invariance and variance 10 (VICReg's 25 times equi_factor
    4.5 would weigh the prediction term 112.5)."""
    cfg.model.method = "sie"
    cfg.model.sim_coeff, cfg.model.std_coeff = 10.0, 10.0
    _only_views(cfg)


# The balanced presets' --model.grad_ratio: at λ = 1 (per-pixel mean) the reconstruction's backbone
# gradient is 1-5 % of VICReg's, and VICReg makes the backbone rotation-invariant; a ratio of 1 (λ ≈ 25
# in issue 19's 32 px run, λ settling at ~20 in the demo: tests/train/test_grad_ratio.py) is where `path`
# kept clearly more rotation information than vicreg. The `-paper` presets keep the papers' λ = 1.
BALANCED_RATIO = 1.0


def _balanced(cfg: Config) -> None:
    """λ adapted so that the equivariant and invariant gradients on the backbone are equal in norm."""
    cfg.model.grad_ratio = BALANCED_RATIO


@preset("demo")
def _demo(cfg: Config) -> None:
    """The default: embedded photos, tiny ViT at 64 px, `path` with the paper's conv decoder and a balanced
    λ (model.grad_ratio = 1), 300 steps on a CPU."""
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "conv"
    _balanced(cfg)


@preset("demo-paper")
def _demo_paper(cfg: Config) -> None:
    """The demo with the path paper's fixed λ = 1 instead of the balanced λ."""
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "conv"


@preset("demo-xattn-path")
def _demo_xattn_path(cfg: Config) -> None:
    """The demo with our own decoder for `path`: one cross-attention decoder shared by all K steps."""
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "xattn-path"
    _balanced(cfg)


@preset("demo-vicreg")
def _demo_vicreg(cfg: Config) -> None:
    """The demo setting with VICReg only (no equivariant part)."""
    _demo_base(cfg)
    cfg.model.method = "none"
    _only_views(cfg)


@preset("demo-sie")
def _demo_sie(cfg: Config) -> None:
    """The demo setting with SIE (a hypernetwork predicts z_eq of view 2 from view 1 and θ)."""
    _demo_base(cfg)
    _sie(cfg)


@preset("demo-xattn")
def _demo_xattn(cfg: Config) -> None:
    """The demo setting with the cross-attention decoder reconstructing view 2 (balanced λ)."""
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "xattn", "xattn"
    _only_views(cfg)
    _balanced(cfg)


@preset("vits16-vicreg")
def _vits16_vicreg(cfg: Config) -> None:
    """The papers' setting (ViT-S/16, 224 px, batch 2048, 800 epochs; needs CUDA) with VICReg."""
    _vits16_base(cfg)
    cfg.model.method = "none"
    _only_views(cfg)


@preset("vits16-sie")
def _vits16_sie(cfg: Config) -> None:
    """The papers' setting (ViT-S/16, 224 px, batch 2048, 800 epochs; needs CUDA) with SIE."""
    _vits16_base(cfg)
    _sie(cfg)


@preset("vits16-xattn")
def _vits16_xattn(cfg: Config) -> None:
    """The papers' setting (ViT-S/16, 224 px, batch 2048, 800 epochs; needs CUDA) with xattn, balanced λ."""
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "xattn", "xattn"
    _only_views(cfg)
    _balanced(cfg)


@preset("vits16-xattn-paper")
def _vits16_xattn_paper(cfg: Config) -> None:
    """vits16-xattn with the paper's fixed λ = 1."""
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "xattn", "xattn"
    _only_views(cfg)


@preset("vits16-path")
def _vits16_path(cfg: Config) -> None:
    """The papers' setting (ViT-S/16, 224 px, batch 2048, 800 epochs; needs CUDA) with path, K = 2,
    and the paper's decoder (K independent linear + 4-conv decoders), balanced λ."""
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "conv"
    _balanced(cfg)


@preset("vits16-path-paper")
def _vits16_path_paper(cfg: Config) -> None:
    """vits16-path with the path paper's fixed λ = 1."""
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "conv"


@preset("vits16-xattn-path")
def _vits16_xattn_path(cfg: Config) -> None:
    """The papers' setting with path and our cross-attention decoder shared by all K steps (the fused
    kernels), balanced λ."""
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "xattn-path"
    _balanced(cfg)


# --- the DINO family (model.family dino | ibot | dinov2) -----------------------------------------


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
    cfg.model.dino = DinoConfig(out_dim=65536 if dinov2 else 8192, norm_last_layer=False)
    cfg.optim.teacher = TeacherSchedule(momentum=0.992 if dinov2 else 0.996)
    cfg.model.expander = ()  # VICReg's projector; the family has its own head (SIE: no eq projector)
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
    cfg.model.method, cfg.model.decoder = ("path", "conv") if path else ("none", "conv")
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
    cfg.model.method, cfg.model.decoder = ("path", "conv") if path else ("none", "conv")
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


# --- loading --------------------------------------------------------------------------------------


def load_config(preset_name: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults -> preset -> `--section.field=value` overrides (also accepts `--key value`)."""
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    cfg = Config(preset=preset_name)
    PRESETS[preset_name](cfg)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `--section.field=value` (or `--section.field value`) items to cfg in place and check it."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --section.field=value")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if not items:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            value = items.pop(0)
        set_by_key(cfg, key, value)
    check(cfg)
    return cfg


def load_file(path: str | Path) -> Config:
    """A config saved as JSON or YAML: `--print-config` output, or a run's config.json (whose tree
    sits under "config" beside its provenance keys). Checked like a command-line config."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {path}: not valid JSON ({err}); YAML files end in .yaml") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "preset" not in data:
        data = data["config"]  # a run folder's config.json
    cfg = from_dict(data, where=f"--config {path}")
    cfg.run.resume = (
        ""  # a saved config is the base of a new run (a resumed run's config.json names its checkpoint)
    )
    check(cfg)
    return cfg
