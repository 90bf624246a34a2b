"""One typed config tree: dataclass defaults -> named preset -> command-line overrides.

    cfg = load_config("demo", ["--model.lam=0.5", "--data.batch_size=64"])

Every leaf field can be overridden as `--section.field=value` (nested: `--data.aug.k=3`); tuples are
comma-separated (`--data.aug.transforms=rotation,blur`); an unknown key or an unparsable value is a
one-line error. `to_dict(cfg)` is what a run saves as config.json.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model.config import ModelConfig
from pipeline.batch import DataConfig
from pipeline.errors import ConfigError
from pipeline.path import PathConfig

OPTIMIZERS = ("adamw", "apex_adam", "apex_lamb")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch, fused on CUDA) | apex_adam | apex_lamb (apex when installed)
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 800.0  # the schedule's length; total steps = epochs * batches per epoch
    warmup_epochs: float = 10.0
    clip_grad: float = 3.0  # max global grad norm; 0 = off


@dataclass
class RunConfig:
    out: str = ""  # the run folder (config.json, metrics.jsonl, ckpt/, recon.png); "" = runs/<preset>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    steps: int = 0  # stop after this step without changing the schedule; 0 = run the whole schedule
    resume: str = ""  # checkpoint to continue from
    amp: str = "bf16"  # bf16 autocast on CUDA | off (CPU always runs fp32)
    log_every: int = 10
    ckpt_every: int = 500
    recon_every: int = 200  # reconstruction grid PNG every N steps (and at the end)
    keep_ckpts: int = 2  # step checkpoints kept besides ckpt/last.pt
    threads: int = 0  # torch CPU threads per rank; 0 = auto (on a CPU device: cores per rank minus data workers)


@dataclass
class Config:
    preset: str = "demo"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


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
    cfg.model = ModelConfig(backbone="vit_tiny_patch16_224", patch_size=8, depth=4, d_patch=128, d_inv=64,
                            dec_width=96, dec_depth=2, dec_heads=3, conv_width=64, expander=(256, 256))
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


@preset("demo")
def _demo(cfg: Config) -> None:
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "xattn-path"


@preset("demo-vicreg")
def _demo_vicreg(cfg: Config) -> None:
    _demo_base(cfg)
    cfg.model.method = "vicreg"
    _only_views(cfg)


@preset("demo-sie")
def _demo_sie(cfg: Config) -> None:
    _demo_base(cfg)
    cfg.model.method = "sie"
    _only_views(cfg)


@preset("demo-xattn")
def _demo_xattn(cfg: Config) -> None:
    _demo_base(cfg)
    cfg.model.method, cfg.model.decoder = "xattn", "xattn"
    _only_views(cfg)


@preset("vits16-vicreg")
def _vits16_vicreg(cfg: Config) -> None:
    _vits16_base(cfg)
    cfg.model.method = "vicreg"
    _only_views(cfg)


@preset("vits16-sie")
def _vits16_sie(cfg: Config) -> None:
    _vits16_base(cfg)
    cfg.model.method = "sie"
    _only_views(cfg)


@preset("vits16-xattn")
def _vits16_xattn(cfg: Config) -> None:
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "xattn", "xattn"
    _only_views(cfg)


@preset("vits16-path")
def _vits16_path(cfg: Config) -> None:
    _vits16_base(cfg)
    cfg.model.method, cfg.model.decoder = "path", "xattn-path"


# --- overrides ------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp in (int, float, str):
            return tp(text)
        if origin is tuple:
            args = typing.get_args(tp)
            items = [s for s in text.split(",") if s != ""]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_parse_value(s, args[0], key) for s in items)
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(_parse_value(s, a, key) for s, a in zip(items, args))
    except ValueError as err:
        raise ConfigError(f"--{key}={text}: cannot parse as {getattr(tp, '__name__', tp)} ({err})") from None
    raise ConfigError(f"--{key}: fields of type {tp} cannot be set from the command line")


def set_by_key(cfg: Config, key: str, text: str) -> None:
    """Set a leaf field from its dotted key and string value, e.g. ("data.aug.k", "3")."""
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        types = _field_types(type(obj))
        if part not in types:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key --{key}: {where} has no field {part!r} (fields: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types[part]):
                raise ConfigError(f"--{key} is a section, set one of its fields (--{key}.FIELD=VALUE)")
            setattr(obj, part, _parse_value(text, types[part], key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"unknown config key --{key}: {'.'.join(parts[:i + 1])} is not a section")


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


def check(cfg: Config) -> None:
    """Reject values the trainer cannot act on, naming the key and the choices."""
    choices = {"run.device": (cfg.run.device, ("auto", "cpu", "cuda")),
               "run.amp": (cfg.run.amp, ("bf16", "off")),
               "optim.name": (cfg.optim.name, OPTIMIZERS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"--{key}={value} is not one of {', '.join(allowed)}")
    positive = {"data.batch_size": cfg.data.batch_size, "optim.epochs": cfg.optim.epochs,
                "run.log_every": cfg.run.log_every, "run.ckpt_every": cfg.run.ckpt_every,
                "run.recon_every": cfg.run.recon_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key}={value} must be positive")
    if cfg.run.steps < 0:
        raise ConfigError(f"--run.steps={cfg.run.steps} must be >= 0 (0 = the whole schedule)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config saved with to_dict (used when resuming)."""

    def build(cls: type, values: dict) -> Any:
        types = _field_types(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in types:
                raise ConfigError(f"saved config has unknown key {cls.__name__}.{name}")
            tp = types[name]
            if dataclasses.is_dataclass(tp):
                kwargs[name] = build(tp, value)
            elif typing.get_origin(tp) is tuple:
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    return build(Config, d)
