"""One typed config tree (the dataclasses) and how a leaf is set from text or rebuilt from a saved dict.

Every leaf field can be set as `--section.field=value` (nested: `--data.aug.k=3`; train/recipes.py
applies them on top of a preset); tuples are comma-separated (`--data.aug.transforms=rotation,blur`);
an unknown key or an unparsable value is a one-line error. `to_dict(cfg)` is what a run saves as
config.json, `from_dict` rebuilds it. This module imports no preset and no check (train/recipes.py
and train/checks.py import it).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from model.config import ModelConfig
from pipeline.batch import DataConfig
from pipeline.errors import ConfigError
from train.distributed import DistConfig


@dataclass
class TeacherSchedule:
    """The DINO family's teacher schedules (train/schedules.py): temperatures warm up linearly, the
    momentum follows a cosine to 1, the prototype layer is frozen at first. Unused by other families."""

    teacher_temp: float = 0.07  # class-token teacher temperature after warm-up
    warmup_teacher_temp: float = 0.04  # class-token teacher temperature at step 0
    patch_temp: float = 0.07  # iBOT patch teacher temperature after warm-up
    warmup_patch_temp: float = 0.04  # iBOT patch teacher temperature at step 0
    warmup_temp_epochs: float = 30.0  # epochs of the linear temperature warm-up
    momentum: float = 0.996  # teacher EMA momentum at step 0 (iBOT 0.996, DINOv2 0.992), cosine to 1
    # No update of the prototype layer in these first epochs (DINO, iBOT, DINOv2: 1).
    freeze_last_layer_epochs: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch, fused on CUDA) | apex_adam | apex_lamb (apex when installed)
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's β1, β2
    epochs: float = 800.0  # the schedule's length; total steps = epochs * batches per epoch
    warmup_epochs: float = 10.0  # linear lr warm-up from 0 to the peak lr
    clip_grad: float = 3.0  # max global grad norm; 0 = off
    # The DINO recipes' schedules (train/schedules.py), off by default:
    lr_scaling: str = "linear"  # lr = base_lr * B / 256 | sqrt: base_lr * sqrt(B / 1024) (DINOv2)
    weight_decay_end: float = -1.0  # cosine from weight_decay to this at the end (DINO 0.4); < 0 = constant
    layer_decay: float = (
        1.0  # layer-wise lr decay: block i of D gets lr * decay^(D - i); 1 = off (DINOv2 0.9)
    )
    patch_embed_lr: float = 1.0  # extra lr factor of the patch embedding (DINOv2 0.2)
    teacher: TeacherSchedule = field(default_factory=TeacherSchedule)  # DINO family (model.family)


@dataclass
class RunConfig:
    out: str = ""  # the run folder (config.json, metrics.jsonl, ckpt/, recon.png); "" = runs/<preset>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # model init and per-rank RNG streams (data.seed seeds the augmentation)
    steps: int = 0  # stop after this step without changing the schedule; 0 = run the whole schedule
    resume: str = ""  # checkpoint to continue from; auto = the newest valid one in the run folder
    amp: str = "bf16"  # bf16 autocast on CUDA | off (CPU always runs fp32)
    compile: str = "auto"  # torch.compile: auto (on for CUDA, off on CPU) | true | false (train/compile.py)
    log_every: int = 10  # a metrics.jsonl row every N steps (and at the last step)
    ckpt_every: int = 500  # ckpt/step-NNNNNN.pt every N steps (and at the last step, and on preemption)
    recon_every: int = 200  # reconstruction grid PNG every N steps (and at the end)
    keep_ckpts: int = 2  # step checkpoints kept besides ckpt/last.pt
    threads: int = (
        0  # torch CPU threads per rank; 0 = auto (on a CPU device: cores per rank minus data workers)
    )
    diagnostics: bool = True  # diag/* every log_every steps: grad ratio ‖∇λL_eq‖/‖∇L_inv‖, recon MSE own/other step (1 fwd + 2 bwd)
    tensorboard: bool = (
        False  # also write the scalars and the recon grid to RUN/tensorboard (pip install eqrecon[tb])
    )


@dataclass
class Config:
    preset: str = "demo"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)


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
                raise ConfigError(f"unknown config key --{key}: {'.'.join(parts[: i + 1])} is not a section")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, where: str = "saved config") -> Config:
    """Rebuild a Config saved with to_dict (a checkpoint's, a config.json's, a --config file's);
    an unknown key or a value of the wrong type is a ConfigError naming the dotted key."""

    def build(cls: type, values: Any, prefix: str) -> Any:
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}"
            )
        types = _field_types(cls)
        kwargs = {}
        for name, value in values.items():
            key = prefix + name
            if name not in types:
                raise ConfigError(
                    f"{where} has unknown key {key} ({cls.__name__}.{name}; fields: "
                    f"{', '.join(sorted(types))})"
                )
            tp = types[name]
            if dataclasses.is_dataclass(tp):
                kwargs[name] = build(tp, value, key + ".")
            else:
                kwargs[name] = _typed(value, tp, key, where)
        return cls(**kwargs)

    return build(Config, d, "")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a decimal number, as YAML 1.2 reads one


def _typed(value: Any, tp: Any, key: str, where: str) -> Any:
    """A leaf value from JSON/YAML checked against its field type (ints are accepted as floats)."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}={value!r} must be a list")
        inner = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(inner) != len(value):
            raise ConfigError(f"{where}: {key}={value!r} must have {len(inner)} items")
        return tuple(_typed(v, t, key, where) for v, t in zip(value, inner))
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4": it needs a dot (1.0e-4) to be a float.
        return float(value)
    ok = (
        isinstance(value, bool)
        if tp is bool
        else (isinstance(value, tp) and not isinstance(value, bool) or (tp is float and type(value) is int))
    )
    if not ok:
        raise ConfigError(f"{where}: {key}={value!r} is not a {getattr(tp, '__name__', tp)}")
    return float(value) if tp is float else value
