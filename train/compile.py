"""torch.compile in training: the `run.compile` policy and where it applies under each strategy.

    model = wrap_compiled(method, cfg.dist, cfg.run.compile, env.device, env.world_size, amp=amp)

in place of `train.distributed.wrap_model`. `run.compile`: auto (on for CUDA, off on a CPU, where
inductor's compile time outweighs what it saves in a short run), true, false. Compiling is in place
(`nn.Module.compile`), so parameter names, state dicts and checkpoints are the same as eager ones.
What is compiled, by strategy:

- one process: the method's whole forward (encoder, heads, decoders and losses: the step's model
  part) in one graph; AOTAutograd compiles its backward. The fused kernels are torch.library custom
  ops (kernels/cross_attention.py, kernels/recon_loss.py), so they stay in the graph as opaque nodes.
- DDP: the DistributedDataParallel wrapper, whole: dynamo's DDPOptimizer splits the graph at DDP's
  bucket boundaries, so each bucket's all-reduce starts while the rest of the backward runs, as in
  eager DDP. (Compiling only the method inside would hand every gradient over at once, at the end of
  one compiled backward, and lose that overlap.) The SSL losses' all_gather is a graph break.
- FSDP2: each transformer block, before fully_shard, as torchtitan does: the all-gather and
  reduce-scatter hooks FSDP puts around a block stay eager (dynamo skips FSDP's hooks), the blocks'
  maths is compiled; the root group's small remainder (patch embedding, heads, decoders) runs eager.

The optimizer step is not compiled (fused AdamW on CUDA is already a few kernels per step).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from kernels import _backend
from pipeline.errors import ConfigError
from train.distributed import DistConfig, wrap_model

CHOICES = ("auto", "true", "false")


def enabled(choice: str, device: torch.device) -> bool:
    """Whether `run.compile=choice` compiles on `device`; a ConfigError for a value it cannot act on."""
    if choice not in CHOICES:
        raise ConfigError(f"--run.compile={choice} is not one of {', '.join(CHOICES)}")
    if choice == "false" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type == "cuda" and _backend.triton_import_error() is not None:
        # inductor generates Triton kernels for CUDA: without triton it cannot compile anything there
        why = f"torch.compile on CUDA needs triton, which does not import ({_backend.triton_import_error()})"
        if choice == "true":
            raise ConfigError(f"--run.compile=true: {why}; install triton or use --run.compile=false")
        _backend.warn_once(f"{why}; run.compile=auto trains eagerly")
        return False
    return True


def wrap_compiled(
    method: nn.Module,
    cfg: DistConfig,
    compile_choice: str,
    device: torch.device,
    world_size: int,
    *,
    amp: bool,
) -> nn.Module:
    """`train.distributed.wrap_model(method, ...)`, compiled per `compile_choice` as the module
    docstring says (the method must already be on `device`)."""
    on = enabled(compile_choice, device)
    fsdp = world_size > 1 and cfg.strategy == "fsdp"
    if on and fsdp:
        for block in (m for m in method.modules() if isinstance(m, Block)):
            block.compile()  # before fully_shard, which then wraps the compiled block in its hooks
    model = wrap_model(method, cfg, device, world_size, amp=amp)
    if on and not fsdp:
        model.compile()
    return model


def is_compiled(model: nn.Module) -> bool:
    """True when `model` itself or any of its modules was compiled in place (for the run's record)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
