"""What the probes embed with: a frozen backbone split like `model.encoder.SplitEncoder`, its
random-init twin, and raw pixels; and the one function that loads a backbone file.

    bb = load_backbone("runs/demo/backbone.safetensors")     # or RUN/ckpt/last.pt
    emb = Embedder.from_backbone(bb, pool="grid2")
    feats = embed(emb, images, batch_size=256, device=device)  # {part: (N, D)}

Parts: `all` = the backbone's tokens, pooled; `inv` / `eq` = the head's z_inv / z_eq channels (the
head runs on every token, then the same pooling: `model.encoder.pool_tokens` is the one rule).
`random_twin` re-initialises a deep copy with timm's own init, so the "no training" baseline has the
very same architecture, head and split. `PixelEmbedder` is the other baseline: the image itself,
area-downsampled to 16×16.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.encoder import PROBE_POOLS, pool_tokens
from pipeline.errors import ProbeError

PARTS = ("all", "inv", "eq")
PIXEL_SIZE = 16


@dataclass
class Backbone:
    """A loaded backbone, the fields of train/backbones.py's `Backbone` that the probes read."""

    model: nn.Module  # timm ViT: forward_features -> (B, prefix + N, C)
    head: nn.Linear | None  # the split head on every token, when known
    d_inv: int  # z[..., :d_inv] invariant, z[..., d_inv:] equivariant
    pool: str  # "avg" | "token": how it was pooled in training
    num_prefix_tokens: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # one line for reports: file, method, step


class Embedder(nn.Module):
    """A frozen backbone (+ its split head): images (B, 3, S, S) in [0, 1] -> {part: (B, D)} pooled by
    `pool` (mean | cls | grid2 | tokens)."""

    def __init__(self, model: nn.Module, head: nn.Linear | None, d_inv: int, pool: str, mean, std,
                 num_prefix_tokens: int):
        super().__init__()
        if pool not in PROBE_POOLS:
            raise ProbeError(f"--pool must be one of {', '.join(PROBE_POOLS)}, got {pool!r}")
        if pool == "cls" and not getattr(model, "has_class_token", False):
            raise ProbeError("--pool cls: this backbone has no class token; use --pool mean")
        self.model, self.head, self.d_inv, self.pool = model.eval(), head, d_inv, pool
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if head is None:
            self.parts: tuple[str, ...] = ("all",)
        else:
            self.parts = ("all", "inv") if d_inv >= head.out_features else PARTS

    @classmethod
    def from_backbone(cls, bb: Backbone, pool: str = "mean") -> Embedder:
        return cls(bb.model, bb.head, bb.d_inv, pool, bb.mean, bb.std, bb.num_prefix_tokens)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.model.forward_features((x - self.mean) / self.std)  # (B, prefix + N, C)
        out = {"all": pool_tokens(tokens, self.num_prefix_tokens, self.pool)}
        if self.head is not None:
            z = self.head(tokens)  # (B, prefix + N, d_patch)
            out["inv"] = pool_tokens(z[..., : self.d_inv], self.num_prefix_tokens, self.pool)
            if "eq" in self.parts:
                out["eq"] = pool_tokens(z[..., self.d_inv :], self.num_prefix_tokens, self.pool)
        return {part: out[part] for part in self.parts}


def random_twin(emb: Embedder, seed: int = 0) -> Embedder:
    """The same architecture, head and split, re-initialised (timm's init_weights where it has one)."""
    twin = copy.deepcopy(emb)
    torch.manual_seed(seed)
    for module in twin.modules():
        if module is not twin and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if hasattr(twin.model, "init_weights"):
        twin.model.init_weights()
    return twin.eval()


class PixelEmbedder(nn.Module):
    """The raw-pixel baseline: (B, 3, S, S) -> {"all": (B, 3·16·16)}, area-downsampled."""

    parts = ("all",)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"all": F.adaptive_avg_pool2d(x.float(), PIXEL_SIZE).flatten(1)}


def embed(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, bar=None) -> dict:
    """model on `images` (N, 3, S, S) in batches -> {part: (N, D) float32 on the CPU}."""
    out: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device, non_blocking=True).float()
        for part, f in model(chunk).items():
            out.setdefault(part, []).append(f.float().cpu())
        if bar is not None:
            bar.update(len(chunk))
    return {part: torch.cat(f) for part, f in out.items()}


# --------------------------------------------------------------------------------------- loading


def load_backbone(path: str | Path) -> Backbone:
    """A training checkpoint (`RUN/ckpt/*.pt`) or an export (`*.safetensors` + its JSON) -> Backbone.

    The one place the probes read backbone files (train/backbones.py's `load_backbone` can replace it).
    """
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"--backbone {path}: no such file")
    if path.suffix in (".pt", ".pth"):
        return _load_checkpoint(path)
    if path.suffix == ".safetensors":
        return _load_export(path)
    raise ProbeError(f"--backbone {path}: expected a training checkpoint (.pt) or an export (.safetensors)")


def _load_checkpoint(path: Path) -> Backbone:
    from model import build_method
    from train.config import ConfigError, from_dict

    try:
        # The trainer's own files also hold RNG states (numpy objects): not loadable weights-only.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, ImportError,
            AttributeError) as err:
        raise ProbeError(f"--backbone {path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ProbeError(f"--backbone {path}: not a train/main.py checkpoint (needs 'model' and 'config' entries)")
    try:
        cfg = from_dict(state["config"])
        method = build_method(cfg.model, cfg.data)
    except (ConfigError, ValueError) as err:
        raise ProbeError(f"--backbone {path}: its saved config does not build a model ({err})") from None
    missing, unexpected = method.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ProbeError(f"--backbone {path}: weights do not match the saved config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    enc = method.encoder
    return Backbone(
        enc.backbone, enc.head, enc.d_inv, "token" if cfg.model.pool == "cls" else "avg",
        enc.backbone.num_prefix_tokens, cfg.data.img_size, tuple(cfg.data.mean), tuple(cfg.data.std),
        f"{path} ({cfg.model.method}, {cfg.model.backbone}, step {state.get('step', '?')})",
    )


def _load_export(path: Path) -> Backbone:
    """`train/export.py` output: timm-keyed weights, the JSON beside it (timm_name, timm_kwargs, mean,
    std) and, when exported `--with-head`, the head file and its split named in the JSON's "head"."""
    import timm
    from safetensors.torch import load_file

    from pipeline.batch import DataConfig

    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ProbeError(f"--backbone {path}: its description {meta_path.name} (written by train/export.py) "
                         f"is missing beside it")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["timm_name"], dict(meta.get("timm_kwargs", {}))
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        model.load_state_dict(load_file(str(path)))
        head, d_inv = None, 0
        if meta.get("head"):
            weights = load_file(str(path.with_name(meta["head"]["file"])))
            head = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            head.load_state_dict(weights)
            d_inv = int(meta["head"]["d_inv"])
    except KeyError as err:
        raise ProbeError(f"--backbone {meta_path}: missing entry {err} (re-export with train/export.py)") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise ProbeError(f"--backbone {path}: unreadable export ({str(err).splitlines()[0]})") from None
    default = DataConfig()
    with_head = ", with head" if head is not None else ""
    return Backbone(
        model, head, d_inv, "avg", model.num_prefix_tokens, int(kwargs.get("img_size", 224)),
        tuple(meta.get("mean", default.mean)), tuple(meta.get("std", default.std)),
        f"{path} ({meta.get('method', '?')}, {name}, step {meta.get('step', '?')}{with_head})",
    )
