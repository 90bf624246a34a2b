"""Test helpers: tiny, realistic model configs (the demo presets shrunk to 32 px, 2 blocks) and fixed batches."""

from __future__ import annotations

import torch

from pipeline.batch import Batch
from pipeline.path import THETA_DIM, PathConfig, sample_theta
from train.config import Config
from train.recipes import load_config

# 32 px views with patch 8: a 4×4 token grid; vit_tiny (width 192) cut to 2 blocks.
TINY = ("--data.img_size=32", "--model.depth=2", "--model.expander=64,64", "--data.batch_size=8")

# (preset, extra overrides) for every method/decoder combination.
VARIANTS = {
    "vicreg": ("demo-vicreg", ()),
    "sie": ("demo-sie", ()),
    "xattn": ("demo-xattn", ()),
    "path-xattn": ("demo-xattn-path", ()),
    "path-conv": ("demo", ()),
}


def tiny_config(preset: str, *overrides: str) -> Config:
    return load_config(preset, [*TINY, *overrides])


def variant_config(name: str, *overrides: str) -> Config:
    preset, extra = VARIANTS[name]
    return tiny_config(preset, *extra, *overrides)


def make_batch(cfg: Config, batch_size: int = 8, seed: int = 0) -> Batch:
    """Smooth random normalised views and targets of the config's sizes, θ sampled from its PathConfig."""
    gen = torch.Generator().manual_seed(seed)
    data = cfg.data
    s, t, k = data.img_size, data.out_target_size, data.aug.k
    aug: PathConfig = data.aug
    theta = sample_theta(aug, torch.full((batch_size, 2), 256), gen)
    assert theta.shape == (batch_size, THETA_DIM)
    return Batch(
        view1=_smooth(gen, batch_size, s),
        view2=_smooth(gen, batch_size, s),
        targets=_smooth(gen, batch_size * k, t).reshape(batch_size, k, 3, t, t),
        theta=theta,
        label=torch.full((batch_size,), -1, dtype=torch.long),
    )


def _smooth(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) unit-variance images with photo-like spatial correlation: 4×4 noise, upsampled."""
    coarse = torch.randn(n, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
