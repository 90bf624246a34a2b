"""The DINO family's teacher: a copy of the student (encoder + head) that follows it by an exponential
moving average, θ_t ← m · θ_t + (1 - m) · θ_s, and is never trained by gradients.

    teacher = EMATeacher(student)                    # student: the nn.Module to follow
    targets = teacher(crops)                         # no autograd graph, eval mode
    ...optimizer.step()
    teacher.update(student, teacher_momentum(step, total_steps, base=0.996))

The momentum follows a cosine from `base` to 1 over training (iBOT 0.996, DINOv2 0.992); the caller
passes its value. The teacher always runs in eval mode: drop-path and dropout are off, as DINO builds
its teacher without them. Buffers are copied from the student at each update. `state_dict()` holds
exactly the teacher's tensors (keys `module.<student key>`), so a checkpoint restores it bit for bit.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.errors import ConfigError


def teacher_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """DINO's cosine schedule: base at step 0, final at total_steps (and after)."""
    if total_steps <= 0:
        raise ConfigError(f"teacher_momentum needs total_steps > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


class EMATeacher(nn.Module):
    """A frozen deep copy of `student`, updated only by `update`."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self._names = [name for name, _ in self.module.named_parameters()]

    def train(self, mode: bool = True) -> EMATeacher:
        """Stays in eval mode whatever the caller asks (a trainer calls method.train() every step)."""
        self.training = mode
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """θ_t ← momentum · θ_t + (1 - momentum) · θ_s for every parameter; buffers copied."""
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"teacher momentum must be in [0, 1], got {momentum}")
        named = list(student.named_parameters())
        if [name for name, _ in named] != self._names:
            raise ValueError(
                "EMATeacher.update: the student's parameters are not the ones the teacher was "
                f"copied from ({len(named)} vs {len(self._names)} tensors, or other names)"
            )
        teacher = list(self.module.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [p.detach() for _, p in named], alpha=1.0 - momentum)
        for mine, theirs in zip(self.module.buffers(), student.buffers()):
            mine.copy_(theirs)
