"""Models: the split encoder, the invariant objectives, the equivariant parts and `build_method`, the
one factory that composes them (model/composed.py). A new objective or part is one new file plus one
line in its registry below (docs/DESIGN.md §1 lists what it must provide)."""

from torch import nn

from model.composed import Composed
from model.config import ModelConfig
from model.dino_objective import DinoObjective
from model.encoder import SplitEncoder, SplitOutput
from model.equivariant import SIE, NoEquivariant, Path, Reconstruction
from model.invariant import VICReg
from pipeline.batch import DataConfig
from pipeline.errors import ConfigError

# model.family -> the invariant objective
INVARIANT: dict[str, type[nn.Module]] = {
    "vicreg": VICReg,
    "dino": DinoObjective,
    "ibot": DinoObjective,
    "dinov2": DinoObjective,
}
# model.method -> the equivariant part
EQUIVARIANT: dict[str, type[nn.Module]] = {
    "none": NoEquivariant,
    "sie": SIE,
    "xattn": Reconstruction,
    "path": Path,
}

__all__ = [
    "EQUIVARIANT",
    "INVARIANT",
    "Composed",
    "ModelConfig",
    "SplitEncoder",
    "SplitOutput",
    "build_method",
]


def build_method(cfg: ModelConfig, data: DataConfig) -> Composed:
    """SplitEncoder (at data.img_size) + INVARIANT[model.family] + EQUIVARIANT[model.method] (K = data.aug.k)."""
    if cfg.family not in INVARIANT:
        raise ConfigError(f"unknown model.family {cfg.family!r}; choose from {', '.join(INVARIANT)}")
    if cfg.method not in EQUIVARIANT:
        hint = " (vicreg is an invariant objective: --model.family=vicreg --model.method=none)"
        raise ConfigError(
            f"unknown model.method {cfg.method!r}; choose from {', '.join(EQUIVARIANT)}"
            + (hint if cfg.method == "vicreg" else "")
        )
    objective, part = INVARIANT[cfg.family], EQUIVARIANT[cfg.method]
    encoder = SplitEncoder(cfg, data.img_size, all_invariant=not part.uses_eq_channels)
    if objective.after_equivariant:
        equivariant = part(cfg, data, encoder, None)
        invariant = objective(cfg, data, encoder)
    else:
        invariant = objective(cfg, data, encoder)
        equivariant = part(cfg, data, encoder, invariant)
    return Composed(cfg, encoder, invariant, equivariant)
