"""The config checks: values the trainer cannot act on become one ConfigError naming the key.

`check(cfg)` (run by load_config and apply_overrides) rejects field values; `check_model(cfg)` (run
by the CLI before anything starts) rejects models that cannot be built from the config; the model
modules' own size rules are run here too, so a mistake is found before data or weights are touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from train.distributed import check_dist_config

if TYPE_CHECKING:
    from train.config import Config

OPTIMIZERS = ("adamw", "apex_adam", "apex_lamb")
LR_SCALING = ("linear", "sqrt")


def check(cfg: Config) -> None:
    """Reject field values the trainer cannot act on, naming the key (and the choices).

    The model's buildability (method, sizes, decoder, backbone) is check_model's: the CLI runs both
    before anything starts, while load_config alone still gives a config the model's own build-time
    errors can be tested with."""
    from model import INVARIANT
    from pipeline import LOADERS

    choices = {
        "run.device": (cfg.run.device, ("auto", "cpu", "cuda")),
        "run.amp": (cfg.run.amp, ("bf16", "off")),
        "optim.name": (cfg.optim.name, OPTIMIZERS),
        "optim.lr_scaling": (cfg.optim.lr_scaling, LR_SCALING),
        "model.family": (cfg.model.family, tuple(INVARIANT)),
        "data.loader": (cfg.data.loader, LOADERS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"--{key}={value} is not one of {', '.join(allowed)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.img_size": cfg.data.img_size,
        "model.patch_size": cfg.model.patch_size,
        "optim.epochs": cfg.optim.epochs,
        "optim.base_lr": cfg.optim.base_lr,
        "run.log_every": cfg.run.log_every,
        "run.ckpt_every": cfg.run.ckpt_every,
        "run.recon_every": cfg.run.recon_every,
        "run.keep_ckpts": cfg.run.keep_ckpts,
    }
    for key, value in positive.items():
        if not value > 0:  # also catches nan
            raise ConfigError(f"--{key}={value} must be positive")
    at_least_zero = {
        "run.steps": (cfg.run.steps, "0 = the whole schedule"),
        "run.threads": (cfg.run.threads, "0 = auto"),
        "model.depth": (cfg.model.depth, "0 = the timm model's depth"),
        "data.aug.k": (cfg.data.aug.k, "0 = no intermediate targets"),
        "data.target_size": (cfg.data.target_size, "0 = data.img_size"),
        "data.workers": (cfg.data.workers, "0 = in the main process"),
        "optim.min_lr": (cfg.optim.min_lr, "the cosine floor"),
        "optim.weight_decay": (cfg.optim.weight_decay, "0 = off"),
        "optim.warmup_epochs": (cfg.optim.warmup_epochs, "0 = no warm-up"),
        "optim.clip_grad": (cfg.optim.clip_grad, "0 = off"),
    }
    for key, (value, meaning) in at_least_zero.items():
        if not value >= 0:
            raise ConfigError(f"--{key}={value} must be >= 0 ({meaning})")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"--optim.betas={','.join(map(str, cfg.optim.betas))}: each beta must be in [0, 1)")
    if not 0 < cfg.optim.layer_decay <= 1 or not cfg.optim.patch_embed_lr > 0:
        raise ConfigError(
            f"--optim.layer_decay={cfg.optim.layer_decay} must be in (0, 1] and "
            f"--optim.patch_embed_lr={cfg.optim.patch_embed_lr} positive"
        )
    check_dist_config(cfg.dist)
    check_multicrop(cfg)
    if cfg.run.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
        except ImportError:
            raise ConfigError(
                "--run.tensorboard=true needs the tensorboard package: "
                "pip install eqrecon[tb] (or pip install tensorboard)"
            ) from None


def check_multicrop(cfg: Config) -> None:
    """The DINO family and multi-crop go together, and the global crops are the views."""
    from pipeline.multicrop import validate

    mc, family = cfg.data.multicrop, cfg.model.family
    if family == "vicreg":
        if mc.enabled:
            raise ConfigError(
                "--data.multicrop.enabled=true needs a DINO family (--model.family=dino|ibot|dinov2): "
                f"model.method={cfg.model.method} alone reads no local crops"
            )
        return
    if not mc.enabled:
        raise ConfigError(
            f"--model.family={family} needs multi-crop: --data.multicrop.enabled=true (the DINO "
            "presets set it)"
        )
    if family != "dino" and not mc.masks:
        raise ConfigError(f"--model.family={family} needs iBOT's masks: --data.multicrop.masks=true")
    validate(mc)
    if mc.patch_size != cfg.model.patch_size:
        raise ConfigError(
            f"--data.multicrop.patch_size={mc.patch_size} must equal --model.patch_size="
            f"{cfg.model.patch_size} (the masks cut the global crops into the encoder's patches)"
        )
    if mc.global_size != cfg.data.img_size or tuple(mc.global_scale) != tuple(cfg.data.aug.crop_scale):
        raise ConfigError(
            f"the global crops are the views: --data.multicrop.global_size={mc.global_size} and "
            f"global_scale={mc.global_scale} must equal --data.img_size={cfg.data.img_size} and "
            f"--data.aug.crop_scale={cfg.data.aug.crop_scale}"
        )


def check_model(cfg: Config) -> None:
    """ConfigError, naming the key, for a model that cannot be built from cfg: the method, the
    size rules (img_size / patch_size, the d_inv split), the path decoder and K, the timm backbone."""
    import timm

    from model import EQUIVARIANT

    if cfg.model.method not in EQUIVARIANT:
        hint = " (vicreg is an invariant objective: --model.family=vicreg --model.method=none)"
        raise ConfigError(
            f"--model.method={cfg.model.method} is not one of {', '.join(EQUIVARIANT)}"
            + (hint if cfg.model.method == "vicreg" else "")
        )
    if cfg.data.img_size % cfg.model.patch_size:
        raise ConfigError(
            f"--data.img_size={cfg.data.img_size} is not divisible by "
            f"--model.patch_size={cfg.model.patch_size}"
        )
    if cfg.model.method != "none" and not 0 < cfg.model.d_inv < cfg.model.d_patch:
        raise ConfigError(
            f"--model.d_inv={cfg.model.d_inv} must be in (0, --model.d_patch={cfg.model.d_patch}) "
            f"for the split method {cfg.model.method}, so that z_eq keeps d_patch - d_inv channels"
        )
    if cfg.model.method == "path":
        if cfg.model.decoder not in ("conv", "xattn-path"):
            raise ConfigError(
                f"--model.decoder={cfg.model.decoder} is not a path decoder; choose conv or xattn-path "
                "(the xattn method uses the xattn decoder)"
            )
        if cfg.data.aug.k < 1:
            raise ConfigError(
                f"--data.aug.k={cfg.data.aug.k}: the path method reconstructs K >= 1 intermediate images"
            )
    if not timm.is_model(cfg.model.backbone):
        raise ConfigError(
            f"--model.backbone={cfg.model.backbone} is not a timm model name "
            "(e.g. vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224)"
        )
    _check_model_rules(cfg)


def _check_model_rules(cfg: Config) -> None:
    """The size rules the model and path modules own, as ConfigErrors. They raise ValueError today;
    a ConfigError they may raise instead passes through unchanged."""
    from model.decoders import check_decoder_config
    from model.encoder import check_encoder_config
    from pipeline.path import validate

    decoder = {"xattn": "xattn", "path": cfg.model.decoder}.get(cfg.model.method)
    try:
        validate(cfg.data.aug)
        check_encoder_config(cfg.model, cfg.data.img_size, all_invariant=cfg.model.method == "none")
        if decoder in ("conv", "xattn", "xattn-path"):
            grid = cfg.data.img_size // cfg.model.patch_size
            check_decoder_config(decoder, cfg.model, grid, cfg.data.out_target_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
