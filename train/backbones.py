"""Any backbone the probes take: an eqrecon export, an eqrecon training checkpoint, or any timm ViT.

    load_backbone("runs/demo/backbone")                  # a train/export.py folder
    load_backbone("runs/demo/ckpt/last.pt")              # a training checkpoint
    load_backbone("timm:vit_small_patch16_224:w.pth")    # any timm ViT with a local weights file
    load_backbone("timm:vit_small_patch16_224")          # ... or randomly initialised (a floor to compare with)

so that a user compares eqrecon's backbone with the one they use today on the same protocol. Weights
are only ever read from local files (no hub downloads). Every spec gives the same `Backbone`: a timm
model in eval mode whose `forward_features` returns tokens (B, prefix + N, D), how to pool them, the
input size and normalisation the backbone expects, and eqrecon's split head when there is one.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pipeline.errors import ExportError, ProbeError
from train import export

POOLS = ("avg", "token")  # timm's global_pool names: mean of the patch tokens | the class token


@dataclass
class Backbone:
    """A frozen backbone and what it expects (see the module docstring for the specs)."""

    model: nn.Module  # timm ViT, eval mode; forward_features: (B, 3, H, W) -> (B, prefix + N, D)
    head: nn.Linear | None  # eqrecon's split head, D -> d_patch; None for a plain timm model
    d_inv: int | None  # z = head(pooled): z[:, :d_inv] invariant, z[:, d_inv:] equivariant
    pool: str  # "avg" | "token"
    num_prefix_tokens: int  # class + register tokens ahead of the patch tokens
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str  # one line for reports: the spec and what it is

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) tokens -> (B, D): timm's own pooling, i.e. what `model(x)` returns."""
        return self.model.forward_head(tokens, pre_logits=True)


def load_backbone(
    spec: str | Path, device: str | torch.device = "cpu", img_size: int | None = None
) -> Backbone:
    """An export folder, a training checkpoint file, or `timm:NAME[:WEIGHTS_FILE]` -> Backbone on `device`.

    img_size (default: the backbone's own) makes it take img_size x img_size images by resampling its
    position embedding; it must be a multiple of the patch size.
    """
    spec = str(spec)
    if spec.startswith("timm:"):
        backbone = _from_timm(spec, img_size)
    elif Path(spec).is_dir():
        backbone = _from_export(Path(spec), img_size)
    elif Path(spec).is_file():
        backbone = _from_checkpoint(Path(spec), img_size)
    else:
        raise ProbeError(
            f"--backbone {spec}: no such export folder or checkpoint "
            f"(or use timm:NAME[:WEIGHTS_FILE] for a timm model)"
        )
    backbone.model.to(device)
    if backbone.head is not None:
        backbone.head.to(device)
    return backbone


def _from_export(folder: Path, img_size: int | None) -> Backbone:
    _check_export_shapes(folder)
    model = export.load_export(folder, img_size)
    head, d_inv = export.load_split_head(folder) if (folder / export.HEAD).is_file() else (None, None)
    meta = export.read_config(folder).get("eqrecon", {})
    what = f"{meta.get('method', '?')}, step {meta.get('step', '?')}" if meta else "timm export"
    return _describe(model, head, d_inv, f"{folder} ({what}, {model.pretrained_cfg['architecture']})")


def _check_export_shapes(folder: Path) -> None:
    """ExportError when the weights file's tensor shapes disagree with the architecture config.json names
    (e.g. a foreign model.safetensors of another patch size): timm's pretrained filter would resample
    its patch and position embeddings and load it without a word. Reads the file's header only; a
    missing or damaged file is left to export.load_export, which names it."""
    weights, config = folder / export.WEIGHTS, folder / export.CONFIG
    if not (weights.is_file() and config.is_file()):
        return
    cfg = export.read_config(folder)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no dict)
    except (SafetensorError, OSError):
        return
    kwargs = {"num_classes": cfg.get("num_classes", 0), **cfg.get("model_args", {})}
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            skeleton = timm.create_model(cfg["architecture"], pretrained=False, **kwargs)
    except (KeyError, RuntimeError, TypeError) as err:
        raise ExportError(f"{config}: names no buildable timm architecture ({err})") from None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key, shape in want.items():
        if key in shapes and shapes[key] != shape:
            raise ExportError(
                f"{weights}: {key} is {list(shapes[key])} but {config.name} ({cfg['architecture']}, "
                f"{cfg.get('model_args', {})}) needs {list(shape)}; these weights belong to another model "
                "(re-export with train/export.py)"
            )


def _from_checkpoint(path: Path, img_size: int | None) -> Backbone:
    method, ckpt = export.load_method(path)
    enc, _ = export.exported_encoder(method)  # the teacher for the DINO family, as the export
    # The same timm model the export writes, so a checkpoint and its export probe identically.
    model = export.timm_backbone(enc, img_size)
    data = ckpt["config"]["data"]
    return Backbone(
        model=model,
        head=enc.head.eval(),
        d_inv=enc.d_inv,
        pool=export.TIMM_POOL[enc.pool],
        num_prefix_tokens=model.num_prefix_tokens,
        img_size=model.patch_embed.img_size[0],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        name=f"{path} ({ckpt['config']['model']['method']}, {enc.timm_name}, step {ckpt.get('step', '?')})",
    )


def _from_timm(spec: str, img_size: int | None) -> Backbone:
    name, _, weights = spec[len("timm:") :].partition(":")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm's "Unknown model (...)"
        raise ProbeError(f"--backbone {spec}: timm has no model {name!r} ({err})") from None
    _check_vit(model, spec)
    if weights:
        _load_weights(model, Path(weights), spec)
    if img_size:
        export.set_img_size(model, img_size, "img_size")
    return _describe(
        model.eval(), None, None, f"{spec} ({'weights ' + weights if weights else 'random init'})"
    )


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """A local .safetensors / .pth / .bin of the same architecture, loaded strictly except the classifier."""
    if not path.is_file():
        raise ProbeError(f"--backbone {spec}: no such weights file {path}")
    try:
        # timm's reader: safetensors or torch (weights_only), unwraps {"state_dict"|"model": ...}.
        state = timm.models.load_state_dict(str(path))
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ProbeError(
            f"--backbone {spec}: unreadable weights file {path} ({str(err).splitlines()[0]})"
        ) from None
    # The architecture's own converter, as timm applies to its pretrained files (official DINOv2, CLIP,
    # ... layouts; a position embedding of another grid is resampled).
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    # A classifier checkpoint carries its head; the probe uses features (num_classes=0) only.
    classifier = model.pretrained_cfg.get("classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:
        state.pop(f"{prefix}.weight", None)
        state.pop(f"{prefix}.bias", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, even with strict=False; the first line names the model
        reason = str(err).strip().splitlines()[-1].strip()
        raise ProbeError(f"--backbone {spec}: {path} holds another architecture ({reason})") from None
    if missing or unexpected:
        raise ProbeError(
            f"--backbone {spec}: {path} does not match {model.pretrained_cfg['architecture']} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _check_vit(model: nn.Module, name: str) -> None:
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
        raise ProbeError(f"--backbone {name}: not a timm Vision Transformer (the probes read its tokens)")


def _describe(model: nn.Module, head: nn.Linear | None, d_inv: int | None, name: str) -> Backbone:
    """A timm model -> Backbone, with the statistics from its pretrained cfg and the size it takes now."""
    _check_vit(model, name)
    pool = getattr(model, "global_pool", "")
    if pool not in POOLS:
        raise ProbeError(
            f"--backbone {name}: pools its tokens with {pool!r}; the probes take {' or '.join(POOLS)}"
        )
    cfg = timm.data.resolve_data_config(model=model)
    height, width = model.patch_embed.img_size
    if height != width:
        raise ProbeError(f"--backbone {name}: takes {height}x{width} images; the probes render square ones")
    return Backbone(
        model=model,
        head=head,
        d_inv=d_inv,
        pool=pool,
        num_prefix_tokens=model.num_prefix_tokens,
        img_size=height,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        name=name,
    )
