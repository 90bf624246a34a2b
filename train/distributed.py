"""The data-parallel strategy: one process, DDP, or FSDP2 sharding of a ViT-L-sized method.

    model = wrap_model(method, cfg.dist, env.device, env.world_size)   # before building the optimizer
    optimizer = build_optimizer(cfg.optim, unwrap(model), ...)          # FSDP: over the sharded params
    norm = clip_grad_norm(params, cfg.optim.clip_grad)                  # a plain tensor, any strategy
    state = {"model": model_state_dict(model), "optimizer": optimizer_state_dict(model, optimizer)}
    load_model_state_dict(model, state["model"]); load_optimizer_state_dict(model, optimizer, state["optimizer"])

Strategies (`--dist.strategy`):

- `ddp` (default): DistributedDataParallel, BatchNorm converted to SyncBatchNorm on CUDA (global
  batch statistics in VICReg's expander; SyncBatchNorm does not run on CPU).
- `fsdp`: FSDP2 `fully_shard` on every transformer block (every `timm.models.vision_transformer.Block`
  in the method: the student's and the teacher's), then on the method itself, whose group holds the
  remaining parameters (patch embedding, heads, decoders, ...). Parameters, gradients and optimizer
  states are sharded over the ranks; a block's full weights exist only around its own forward and
  backward. Mixed precision: parameters all-gathered in `dist.param_dtype`, gradients reduced in
  `dist.reduce_dtype` (fp32), and the sharded master weights and optimizer states stay fp32. auto =
  bf16 when the forward runs under the loop's bf16 autocast (CUDA, `run.amp=bf16`), fp32 otherwise
  (the CPU, where bf16 matmuls are slow). bf16 weights need that autocast: FSDP casts parameters but
  not buffers (fixed position tables, BatchNorm statistics), and without autocast an fp32 buffer
  meets a bf16 LayerNorm weight; so bf16 without it is a ConfigError.

The EMA teacher of the DINO family (model/teacher.py) is sharded exactly like the student: its blocks
get their own groups and its other tensors sit in the root group beside the student's, so every
teacher parameter is a DTensor with the same placement and the same local shard as the student
parameter it follows. (The teacher gets no group of its own: the family calls its encoder's parts
directly, never its forward, so such a group would never be gathered.) `EMATeacher.update` then
runs `torch._foreach_*` on those DTensors, which DTensor executes shard by shard with no
communication (tests/train/test_distributed.py checks it against the formula). Its parameters never
require gradients, so FSDP reduces nothing for them; a teacher block's gathered weights are freed
after its forward, and the root group (teacher's and student's alike) is gathered for the step.

Checkpoints do not depend on the strategy: the state dicts are taken and set through
`torch.distributed.checkpoint.state_dict` with full (unsharded) tensors offloaded to the CPU of rank 0,
with the method's own keys (no `module.` prefix) and the optimizer state keyed by parameter name. A
checkpoint written by one process, by DDP or by FSDP loads under any of them. An optimizer state that
numbers its parameters (`optimizer.state_dict()`, as eqrecon wrote before 0.1.0's checkpoint format)
is a CheckpointError.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.errors import CheckpointError, ConfigError

STRATEGIES = ("ddp", "fsdp")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Full tensors gathered to rank 0's CPU for saving; on load every rank holds the full dict and keeps its shard.
SAVE_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD_OPTIONS = StateDictOptions(full_state_dict=True)


@dataclass
class Env:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class DistConfig:
    """How several ranks share the training (the `dist` section of the config tree)."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2: parameters, gradients and optimizer states sharded)
    fsdp_reshard_after_forward: bool = (
        True  # free gathered block weights after forward (re-gather in backward)
    )
    param_dtype: str = (
        "auto"  # fsdp dtype of the gathered weights: auto (bf16 under bf16 autocast, else fp32) | bf16 | fp32
    )
    reduce_dtype: str = "fp32"  # fsdp gradient reduce-scatter dtype: fp32 | bf16


def check_dist_config(cfg: DistConfig) -> None:
    """One-line errors for values wrap_model cannot act on."""
    choices = {
        "dist.strategy": (cfg.strategy, STRATEGIES),
        "dist.param_dtype": (cfg.param_dtype, ("auto", *DTYPES)),
        "dist.reduce_dtype": (cfg.reduce_dtype, tuple(DTYPES)),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"--{key}={value} is not one of {', '.join(allowed)}")


def param_dtype(cfg: DistConfig, amp: bool) -> torch.dtype:
    """The FSDP compute dtype; amp = the forward runs under bf16 autocast (CUDA and run.amp=bf16)."""
    if cfg.param_dtype == "auto":
        return torch.bfloat16 if amp else torch.float32
    if cfg.param_dtype == "bf16" and not amp:
        raise ConfigError(
            "--dist.param_dtype=bf16 needs the bf16 autocast of --run.amp=bf16 on a CUDA device "
            "(FSDP casts parameters, not buffers); use --dist.param_dtype=auto or fp32"
        )
    return DTYPES[cfg.param_dtype]


# --- wrapping -------------------------------------------------------------------------------------


def wrap_model(
    method: nn.Module, cfg: DistConfig, device: torch.device, world_size: int, *, amp: bool = False
) -> nn.Module:
    """The method ready for training on `world_size` ranks (it must already be on `device`); amp:
    the loop runs the forward under bf16 autocast (it picks FSDP's auto parameter dtype).

    One process: the method itself. DDP: a DistributedDataParallel around it. FSDP: the method itself,
    sharded in place (its class becomes an FSDPModule subclass; parameter names are unchanged).
    Build the optimizer afterwards, from `unwrap(model)`, so that it holds the parameters that train.
    """
    check_dist_config(cfg)
    if world_size == 1:
        return method
    if cfg.strategy == "ddp":
        ids = None
        if device.type == "cuda":
            # Global-batch BatchNorm statistics in the expander, as VICReg trains (GPU-only in torch).
            method, ids = nn.SyncBatchNorm.convert_sync_batchnorm(method), [device.index]
        return nn.parallel.DistributedDataParallel(method, device_ids=ids)
    return shard(method, cfg, device, world_size, amp)


def shard(method: nn.Module, cfg: DistConfig, device: torch.device, world_size: int, amp: bool) -> nn.Module:
    """FSDP2: one group per transformer block (student's and teacher's), then the root for the rest."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype(cfg, amp), reduce_dtype=DTYPES[cfg.reduce_dtype])
    blocks = [m for m in method.modules() if isinstance(m, Block)]
    if not blocks:
        raise ConfigError(
            f"--dist.strategy=fsdp shards a timm ViT per transformer block, but "
            f"{type(method).__name__} holds no timm.models.vision_transformer.Block"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    # The root's parameters are gathered at its forward and kept for backward (FSDP2's root default).
    fully_shard(method, mesh=mesh, mp_policy=policy)
    return method


def unwrap(model: nn.Module) -> nn.Module:
    """The method inside a DDP wrapper; the model itself otherwise (FSDP shards in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# --- gradients ------------------------------------------------------------------------------------


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients, as a plain tensor on every rank, clipped to max_norm if > 0.

    Under FSDP the gradients are DTensor shards: torch's norm reduces them to a DTensor (the shards'
    partial norms), which `full_tensor()` all-reduces into the norm of the whole model, the same
    number DDP and one process get.
    """
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --- strategy-independent state -------------------------------------------------------------------


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the method's full state dict on rank 0's CPU (empty on the other ranks under several
    ranks), with the keys `method.state_dict()` has, whatever the strategy. Like state_dict(), it may
    alias the live tensors (one process or DDP on CPU): save it before the next step."""
    return get_model_state_dict(model, options=SAVE_OPTIONS)


def load_model_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], where: str = "the checkpoint"
) -> None:
    """Collective: load a full state dict (every rank holds it) into the model, strictly; each rank
    keeps its shard under FSDP. A missing or unexpected key, or a tensor of another shape, is a
    CheckpointError naming them."""
    mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))  # shards: no gather
    missing, unexpected = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
    # A DTensor's shape is the full one, so this compares like with like under every strategy.
    reshaped = [
        f"{k} {tuple(state[k].shape)} (this model: {tuple(v.shape)})"
        for k, v in mine.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{where} does not fit this model: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}, other shapes {_few(reshaped)}; it was written for another "
            "preset or model config"
        )
    set_model_state_dict(model, state, options=LOAD_OPTIONS)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: the optimizer state keyed by parameter name, full tensors on rank 0's CPU."""
    return get_optimizer_state_dict(model, optimizer, options=SAVE_OPTIONS)


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, unstepped: set[str] = frozenset()
) -> None:
    """Collective: load an optimizer state saved by optimizer_state_dict (keyed by parameter name; one
    that numbers its parameters, as `optimizer.state_dict()` does, is a CheckpointError).
    Every trainable parameter must have its state, except those in `unstepped`, which the optimizer
    had not updated yet when the state was saved (train/schedules.py's frozen prototype layer): they
    get a fresh state at their first update, as in a run that was never stopped."""
    if any(not isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"]):
        raise CheckpointError(
            "the checkpoint's optimizer state numbers the parameters instead of naming them "
            "(written by an eqrecon before 0.1.0's checkpoint format); start a new run"
        )
    params = dict(unwrap(model).named_parameters())
    saved = state.get("state", {})
    lacking = {n for n, p in params.items() if p.requires_grad} - saved.keys()
    if lacking and lacking <= unstepped and saved:
        # DCP's loader wants a state for every trainable parameter: load placeholders for these, then
        # drop them, so that their first update starts a fresh state as in the straight run.
        state = {**state, "state": {**saved, **_placeholders(params, saved, lacking)}}
        set_optimizer_state_dict(model, optimizer, state, options=LOAD_OPTIONS)
        for name in lacking:
            optimizer.state.pop(params[name], None)
        return
    set_optimizer_state_dict(model, optimizer, state, options=LOAD_OPTIONS)


def _placeholders(params: dict[str, nn.Parameter], saved: dict, names: set[str]) -> dict[str, dict]:
    """Zero optimizer states for `names`, shaped after the saved state of the largest parameter: its
    per-element tensors (Adam's moments) at each parameter's full shape, the rest (`step`) as they are."""
    template = max(saved, key=lambda n: params[n].numel())
    full = tuple(params[template].shape)

    def like(v, shape):
        if not isinstance(v, torch.Tensor):
            return v
        return torch.zeros(shape if tuple(v.shape) == full else v.shape, dtype=v.dtype)

    return {n: {k: like(v, tuple(params[n].shape)) for k, v in saved[template].items()} for n in names}


def _few(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Collective under FSDP: the root group's parameters gathered for a call that is not the
    model's forward (`method.reconstruct` for the recon grid), which every rank must then make (the
    blocks gather theirs inside it). A no-op for one process and DDP."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# --- process setup ----------------------------------------------------------------------------------


def init_distributed(choice: str, preset: str = "") -> Env:
    """Process group from torchrun's environment (NCCL on GPUs, Gloo on CPUs); none for plain python."""
    if choice == "cuda" and not torch.cuda.is_available():
        why = f" (preset {preset} runs on GPUs)" if preset else ""
        raise ConfigError(
            f"--device cuda was asked for{why} but no CUDA GPU is visible; use --device cpu or "
            "auto to run on the CPU anyway"
        )
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if choice != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return Env(rank=rank, world_size=world, device=device)


def watch_parent(interval_s: float = 1.0) -> None:
    """Under torchrun, exit when the agent that started this worker dies (kill -9 gives it no chance
    to stop its workers, which would otherwise train on, orphaned). A polling thread: portable, and
    unlike PR_SET_PDEATHSIG not tied to the lifetime of the agent's launching thread."""
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(
            f"error: [rank {os.environ.get('RANK', '?')}] the torchrun agent (pid {parent}) died; stopping",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    threading.Thread(target=poll, name="eqrecon-parent-watchdog", daemon=True).start()
