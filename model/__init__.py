"""Models: the split encoder, the decoders, the losses, the methods and the DINO family; `build_method`,
the one factory above them, is the entry."""

import dataclasses

from torch import nn

from model.config import ModelConfig
from model.encoder import SplitEncoder, SplitOutput
from model.families import DinoFamily
from model.methods import METHODS, VICReg
from pipeline.batch import DataConfig
from pipeline.errors import ConfigError

__all__ = ["METHODS", "ModelConfig", "SplitEncoder", "SplitOutput", "VICReg", "build_method"]


def build_method(cfg: ModelConfig, data: DataConfig) -> nn.Module:
    """The configured method, with its encoder at data.img_size and K = data.aug.k: model.method alone
    (family vicreg), or the DINO family model.family with model.method as its equivariant part."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown model.method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.family == "vicreg":
        return METHODS[cfg.method](cfg, data)
    equivariant = "none" if cfg.method == "vicreg" else cfg.method
    return DinoFamily(cfg, data, dataclasses.replace(cfg.dino, family=cfg.family), equivariant=equivariant)
