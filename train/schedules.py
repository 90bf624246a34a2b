"""Every schedule, built in one place: the lr (warm-up + cosine, `build_scheduler`), the DINO recipes'
per-step schedules and per-parameter lr scales (the loop calls them; docs/DESIGN.md).

    schedules = Schedules(cfg, steps_per_epoch, total)
    groups = scaled_param_groups(method, groups, cfg.optim, lr)  # layer-wise lr decay, patch-embed lr
    schedules.before_step(method, optimizer, step)             # weight decay, λ
    out = method(batch, **schedules.forward_args(method, step))  # the teacher temperatures
    ...backward, clip
    schedules.before_optimizer(method, step)                   # the frozen prototype layer
    ...optimizer.step()
    schedules.after_step(method, step)                         # the teacher's EMA update

Every value is a pure function of the step (and the config), so a resumed run gets the same values
as a straight one without saving anything: the step is in the checkpoint.

- Weight decay: cosine from optim.weight_decay at step 0 to optim.weight_decay_end at the last step
  (DINO, iBOT, DINOv2: 0.04 -> 0.4), on the groups that decay; weight_decay_end < 0 keeps it constant.
- Teacher temperatures (DINO family): linear warm-up from optim.teacher.warmup_* to optim.teacher.teacher_temp
  / patch_temp over warmup_temp_epochs, then constant (DINO's `teacher_temp_schedule`); a forward
  argument of the method (DINOv2's `forward_backward(images, teacher_temp)`).
- Teacher momentum: model/teacher.py's cosine from optim.teacher.momentum to 1 over the schedule, the value
  of the step just taken (as DINO indexes `momentum_schedule[it]`).
- Prototype layer (DINO family): no update while step < optim.teacher.freeze_last_layer_epochs x steps per
  epoch (DINO's and iBOT's `cancel_gradients_last_layer`, DINOv2's `freeze_last_layer_epochs`): its
  gradients are dropped after clipping, so the grad norm still counts them, as DINO's does.
- Layer-wise lr decay (DINOv2's `get_vit_lr_decay_rate`): with D blocks, the patch embedding, position
  embedding, class/register tokens and the mask token are layer 0, block i is layer i + 1, everything
  else (final norm, heads, decoders) layer D + 1; a parameter's lr is scaled by decay^(D + 1 - layer),
  and the patch embedding's by optim.patch_embed_lr on top.
- λ with model.grad_ratio = R > 0 (LamController): the one schedule that is not a function of the step.
  Every model.grad_ratio_every steps the loop measures the backbone gradient norms of L_inv and λ·L_eq
  (model/diagnostics.py); the controller keeps a moving average of log(‖∇L_eq‖/‖∇L_inv‖) per unit λ
  and sets λ = R / exp(average), at most ×/÷ MAX_STEP per update, within model.lam_range. Its state
  (three floats) is saved in the checkpoint, so a resumed run continues with the same λ bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.teacher import teacher_momentum
from pipeline.errors import ConfigError
from train.config import Config, OptimConfig

# Names (the last components before the parameter name) that sit at layer 0, as DINOv2 lists them.
LAYER_ZERO = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")


def cosine(start: float, end: float, step: int, total: int) -> float:
    """start at step 0, end at step total (and after), half a cosine between."""
    progress = min(max(step, 0), total) / max(1, total)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup(start: float, end: float, step: int, steps: int) -> float:
    """Linear from start at step 0 to end at step `steps`, then end."""
    return end if step >= steps else start + (end - start) * step / steps


class LamController:
    """λ adapted so that the backbone gradient ratio ‖∇λL_eq‖/‖∇L_inv‖ tracks model.grad_ratio.

    The measured ratio is linear in λ, so one measurement gives the unit ratio r = ratio / λ and the
    λ that would have hit the target, R / r. r drifts slowly over training but is noisy from batch to
    batch: an exponential moving average of log r (weight SMOOTH for the newest) smooths it, and each
    update moves λ by at most a factor MAX_STEP, so one outlier batch cannot swing the loss weight."""

    SMOOTH = 0.3
    MAX_STEP = 2.0

    def __init__(self, cfg: ModelConfig):
        self.target, self.every, self.bounds = cfg.grad_ratio, cfg.grad_ratio_every, cfg.lam_range
        if self.target < 0 or (self.target > 0 and self.every < 1):
            raise ConfigError(
                f"--model.grad_ratio={self.target} must be >= 0 (0 = off) and --model.grad_ratio_every="
                f"{self.every} >= 1"
            )
        if self.target > 0 and not 0 < self.bounds[0] <= cfg.lam <= self.bounds[1]:
            raise ConfigError(
                f"--model.lam_range={self.bounds[0]},{self.bounds[1]} must be positive and hold the "
                f"starting --model.lam={cfg.lam}"
            )
        if self.target > 0 and cfg.method == "none":
            raise ConfigError(
                "--model.grad_ratio needs an equivariant part (model.method path, xattn or sie); "
                "model.method=none has no equivariant loss to weigh"
            )
        self.lam, self.log_unit, self.updates = float(cfg.lam), None, 0

    @property
    def on(self) -> bool:
        return self.target > 0

    def due(self, step: int) -> bool:
        """Measure after step `step` (steps done, 1-based)?"""
        return self.on and step % self.every == 0

    def update(self, grad_inv: float, grad_eq: float) -> None:
        """One measurement on this rank: ‖∇L_inv‖ and ‖∇λL_eq‖ at the current λ (diag/grad.inv,
        diag/grad.eq). Ranks average log r, so every rank sets the same λ. A measurement with a
        zero or non-finite norm (no equivariant gradient yet) leaves λ as it is."""
        ok = grad_inv > 0 and grad_eq > 0 and math.isfinite(grad_inv) and math.isfinite(grad_eq)
        log_unit = math.log(grad_eq / (self.lam * grad_inv)) if ok else 0.0
        if dist.is_initialized():
            both = torch.tensor([log_unit, float(ok)], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                both = both.cuda()
            dist.all_reduce(both)
            ok = bool(both[1] == dist.get_world_size())
            log_unit = float(both[0]) / dist.get_world_size()
        if not ok:
            return
        prev = self.log_unit
        self.log_unit = log_unit if prev is None else (1 - self.SMOOTH) * prev + self.SMOOTH * log_unit
        wanted = self.target / math.exp(self.log_unit)
        wanted = min(max(wanted, self.lam / self.MAX_STEP), self.lam * self.MAX_STEP)
        self.lam = min(max(wanted, self.bounds[0]), self.bounds[1])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"lam": self.lam, "log_unit": self.log_unit, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.log_unit, self.updates = state["lam"], state["log_unit"], state["updates"]


class Schedules:
    """The schedules of one run: `steps_per_epoch` batches per epoch, the optimizer's total steps."""

    def __init__(self, cfg: Config, steps_per_epoch: int, total: int):
        self.cfg, self.steps_per_epoch, self.total = cfg, steps_per_epoch, total
        self.lam = LamController(cfg.model)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (the other schedules are functions of the step)."""
        return {"lam": self.lam.state_dict()} if self.lam.on else {}

    def load_state_dict(self, state: dict) -> None:
        if self.lam.on and "lam" in state:  # else the controller starts at resume, from model.lam
            self.lam.load_state_dict(state["lam"])

    def weight_decay(self, step: int) -> float:
        o = self.cfg.optim
        return (
            o.weight_decay
            if o.weight_decay_end < 0
            else cosine(o.weight_decay, o.weight_decay_end, step, self.total)
        )

    def temperatures(self, step: int) -> tuple[float, float]:
        """(class-token, patch) teacher temperatures at a step."""
        d = self.cfg.optim.teacher
        steps = round(d.warmup_temp_epochs * self.steps_per_epoch)
        return warmup(d.warmup_teacher_temp, d.teacher_temp, step, steps), warmup(
            d.warmup_patch_temp, d.patch_temp, step, steps
        )

    def momentum(self, step: int) -> float:
        return teacher_momentum(step, self.total, self.cfg.optim.teacher.momentum)

    def prototypes_frozen(self, step: int) -> bool:
        return step < self._frozen_steps()

    def _frozen_steps(self) -> int:
        return round(self.cfg.optim.teacher.freeze_last_layer_epochs * self.steps_per_epoch)

    @staticmethod
    def _prototypes(method: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The DINO family's prototype layer(s); none for the other methods."""
        if method.teacher is None:
            return []
        return [(n, p) for n, p in method.named_parameters() if ".last_layer." in n and p.requires_grad]

    def unstepped(self, method: nn.Module, step: int) -> set[str]:
        """The parameters the optimizer has not updated in the first `step` steps, so that a checkpoint
        taken then holds no optimizer state for them: the prototype layer while it is frozen."""
        return {n for n, _ in self._prototypes(method)} if step <= self._frozen_steps() else set()

    def logged(self, method: nn.Module, step: int) -> dict[str, float]:
        """The step's schedule values for metrics.jsonl (sched/*): weight decay; teacher ones for the DINO family."""
        out = {"sched/weight_decay": self.weight_decay(step)} if self.cfg.optim.weight_decay_end >= 0 else {}
        if self.lam.on:
            out["sched/lam"] = self.lam.lam  # the λ this step trained with
        if method.teacher is not None:
            temp, patch = self.temperatures(step)
            out.update(
                {
                    "sched/teacher_temp": temp,
                    "sched/patch_temp": patch,
                    "sched/momentum": self.momentum(step),
                    "sched/prototypes_frozen": float(self.prototypes_frozen(step)),
                }
            )
        return out

    def forward_args(self, method: nn.Module, step: int) -> dict:
        """The method's forward arguments at step `step`: the teacher temperatures (class token,
        patches) for a method with a teacher, none otherwise."""
        return {"teacher_temp": self.temperatures(step)} if method.teacher is not None else {}

    def before_step(self, method: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Step `step`'s weight decay on the decaying groups and λ (model.grad_ratio)."""
        if self.cfg.optim.weight_decay_end >= 0:
            wd = self.weight_decay(step)
            for group in optimizer.param_groups:
                if group["weight_decay"] > 0:  # the exempt group stays at 0
                    group["weight_decay"] = wd
        if self.lam.on:
            method.lam = self.lam.lam

    def before_optimizer(self, method: nn.Module, step: int) -> None:
        """After clipping, before optimizer.step: while the prototype layer is frozen its gradients are
        dropped, so the optimizer leaves it and its moments alone (DINO's grad = None)."""
        if self.prototypes_frozen(step):
            for _, p in self._prototypes(method):
                p.grad = None

    def after_step(self, method: nn.Module, step: int) -> None:
        """After optimizer.step of step `step`: the teacher follows the student."""
        method.update_teacher(self.momentum(step))


def layer_of(name: str, depth: int) -> int:
    """DINOv2's layer id of a backbone parameter name (timm's, e.g. "blocks.3.attn.qkv.weight")."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return 0 if parts[0] in LAYER_ZERO else depth + 1


def scaled_param_groups(model: nn.Module, groups: list[dict], cfg: OptimConfig, lr: float) -> list[dict]:
    """`groups` (loop.param_groups: decay, no decay) split by lr scale, each with its own "lr" = lr x
    scale; unchanged (one lr) when optim.layer_decay and optim.patch_embed_lr are 1. Only the
    encoder's timm ViT (and the mask token, layer 0) is layered; every other parameter is layer D + 1."""
    if cfg.layer_decay == 1.0 and cfg.patch_embed_lr == 1.0:
        return groups
    backbone = model.encoder.backbone
    depth = len(backbone.blocks)
    layer = {id(p): layer_of(n, depth) for n, p in backbone.named_parameters()}
    patch = {id(p) for p in backbone.patch_embed.parameters()}
    if model.encoder.mask_token is not None:
        layer[id(model.encoder.mask_token)] = 0

    def scale(p: nn.Parameter) -> float:
        s = cfg.layer_decay ** (depth + 1 - layer.get(id(p), depth + 1))
        return s * (cfg.patch_embed_lr if id(p) in patch else 1.0)

    out: list[dict] = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(scale(p), []).append(p)
        out += [{**group, "params": ps, "lr": lr * s} for s, ps in sorted(by_scale.items(), reverse=True)]
    return out


# --- the lr: linear warm-up, then cosine to optim.min_lr (a LambdaLR over the peak lr) ---------------


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """base_lr × B / 256, or × sqrt(B / 1024) with optim.lr_scaling=sqrt (DINOv2's rule)."""
    if cfg.lr_scaling == "sqrt":
        return cfg.base_lr * math.sqrt(global_batch / 1024)
    return cfg.base_lr * global_batch / 256


def total_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    return max(1, round(cfg.epochs * steps_per_epoch))


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Steps of the linear lr warm-up (at least one step of the schedule is left after it)."""
    return min(round(cfg.warmup_epochs * steps_per_epoch), total_steps(cfg, steps_per_epoch) - 1)


def lr_factor(cfg: OptimConfig, global_batch: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up, then cosine down to min_lr."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = warmup_steps(cfg, steps_per_epoch)
    floor = min(1.0, cfg.min_lr / peak_lr(cfg, global_batch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, global_batch: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, global_batch, steps_per_epoch))
