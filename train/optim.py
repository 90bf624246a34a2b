"""The optimizer: AdamW (fused on CUDA) or apex's fused Adam/LAMB, over parameter groups where weight
decay spares biases, norms, embeddings and tokens; the per-group lr scales come from train/schedules.py.

    optimizer = build_optimizer(cfg.optim, method, global_batch, device)
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError
from train.config import OptimConfig
from train.schedules import peak_lr, scaled_param_groups


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: biases, norms, embeddings and tokens are exempt.
    The model's own `no_weight_decay()` names decide when it has one; otherwise only the weights
    of linear and conv layers decay (as in MAE/DINO)."""
    if hasattr(model, "no_weight_decay"):
        exempt = set(model.no_weight_decay())
    else:
        layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        matrices = {f"{m}.weight".lstrip(".") for m, mod in model.named_modules() if isinstance(mod, layers)}
        exempt = {n for n, _ in model.named_parameters()} - matrices
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, global_batch: int, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or apex's FusedAdam / FusedLAMB when asked for."""
    lr = peak_lr(cfg, global_batch)
    groups = scaled_param_groups(model, param_groups(model, cfg.weight_decay), cfg, lr)
    if cfg.name == "adamw":
        fused = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, **fused)
    try:
        from apex.optimizers import FusedAdam, FusedLAMB
    except ImportError:
        raise ConfigError(
            f"--optim.name={cfg.name} needs NVIDIA apex (built from github.com/NVIDIA/apex), "
            "which is not importable; use --optim.name=adamw"
        ) from None
    cls = FusedAdam if cfg.name == "apex_adam" else FusedLAMB
    return cls(groups, lr=lr, betas=cfg.betas, adam_w_mode=True)
