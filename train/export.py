"""Export a trained backbone as a timm model folder, and read such folders back.

    python train/export.py --ckpt runs/demo/ckpt/last.pt --out runs/demo/backbone [--img-size 96]
        [--weights teacher|student]

The DINO family (model.family dino | ibot | dinov2) exports its EMA teacher's encoder by default, as
DINO, iBOT and DINOv2 evaluate it; `--weights student` exports the student's. The other methods have
only a student.

writes the folder timm's `local-dir:` source reads, plus the split head:

    backbone/config.json              architecture, model_args, pretrained_cfg (the trained input_size,
                                      mean, std, interpolation, crop_pct) and an "eqrecon" entry
                                      (checkpoint, step, method, git SHA, the head's split)
    backbone/model.safetensors        the ViT's weights under timm's own key names
    backbone/split_head.safetensors   the linear token head: z = head(tokens), z = [z_inv | z_eq]

Then, with timm alone:

    model = timm.create_model("local-dir:runs/demo/backbone", pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)     # the trained size and statistics
    feats = model(x)                                       # (B, embed_dim): what eqrecon trained

`model(x)` returns exactly the features eqrecon pools: mean pooling is exported as
`global_pool="avg", fc_norm=False` (the mean of the normalised patch tokens), CLS pooling as
`global_pool="token"`. The load is strict: config and weights agree on num_classes=0, so timm keeps
`load_state_dict(strict=True)` and a missing or extra key fails. `load_split_head(folder)` returns
the head and d_inv: `head(model(x))[:, :d_inv]` is the pooled z_inv the SSL loss saw, the rest z_eq
(the head is linear, so pooling before or after it is the same).

`--img-size` other than the training size resamples the position embedding (timm's
`set_input_size`, bicubic): the features then differ from the trained ones, as any
resolution change does. The size must be a multiple of the patch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/export.py` from anywhere

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import CheckpointError, ConfigError, ExportError, UserError, one_line
from train import checkpoint

CONFIG, WEIGHTS, HEAD = "config.json", "model.safetensors", "split_head.safetensors"
TIMM_POOL = {"mean": "avg", "cls": "token"}  # eqrecon's model.pool -> timm's global_pool
# How the trainer and the probe make a view: the largest centred square, bilinear (antialiased).
INTERPOLATION, CROP_PCT = "bilinear", 1.0


# ------------------------------------------------------------------------------- checkpoints


def load_method(ckpt_path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the trained method from a checkpoint written by train.loop; -> (method in eval mode, checkpoint)."""
    from model import build_method
    from train.config import from_dict

    ckpt = checkpoint.read(ckpt_path, flag="")
    try:
        cfg = from_dict(ckpt["config"])
        method = build_method(cfg.model, cfg.data)
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt_path}: its saved config does not build a model ({err})") from None
    missing, unexpected = method.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_path}: weights do not match its saved config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    adapted = ckpt.get("schedules", {}).get("lam")  # model.grad_ratio: the λ the run had reached
    if adapted is not None:
        method.lam = adapted["lam"]
    return method.eval(), ckpt


# ------------------------------------------------------------------------------------ writing


def timm_backbone(encoder, img_size: int | None = None, what: str = "img_size") -> nn.Module:
    """A fresh timm model holding the encoder's backbone whose `model(x)` is eqrecon's pooled features.

    Mean pooling needs fc_norm=False as well as global_pool="avg": timm's default for "avg" moves the
    final norm after the pooling (fc_norm), which is not what the encoder computes. img_size: see
    `set_img_size` (`what` names the setting in its error).
    """
    kwargs = {
        **encoder.timm_kwargs,
        "num_classes": 0,
        "global_pool": TIMM_POOL[encoder.pool],
        "fc_norm": False,
    }
    # The tag names where the weights come from; license=None drops the architecture's default
    # weights' license from the exported config (these weights are not those).
    model = timm.create_model(
        encoder.timm_name,
        pretrained=False,
        pretrained_cfg_overlay={"tag": "eqrecon", "license": None},
        **kwargs,
    )
    model.load_state_dict(encoder.backbone.state_dict(), strict=True)
    if img_size:
        set_img_size(model, img_size, what)
    return model.eval()


def set_img_size(model: nn.Module, size: int, what: str) -> None:
    """Make a timm ViT take size x size images: timm resamples the position embedding (bicubic)."""
    patch = model.patch_embed.patch_size[0]
    trained = model.patch_embed.img_size[0]
    if size == trained:
        return
    if size <= 0 or size % patch:
        raise ExportError(
            f"{what} {size}: must be a positive multiple of the patch size {patch} "
            f"(the backbone was made for {trained})"
        )
    model.set_input_size(img_size=size)  # records the new size in the args an export saves


WEIGHTS_CHOICES = ("auto", "teacher", "student")


def exported_encoder(method: nn.Module, weights: str = "auto"):
    """The SplitEncoder to export: the teacher's (auto, for methods with one) or the student's."""
    if weights not in WEIGHTS_CHOICES:
        raise ExportError(f"--weights {weights}: choose from {', '.join(WEIGHTS_CHOICES)}")
    teacher = getattr(method, "teacher", None)
    if weights == "teacher" and teacher is None:
        raise ExportError(
            f"--weights teacher: model.family={method.cfg.family} has no teacher (only the DINO "
            "family has one); use --weights student"
        )
    if teacher is not None and weights != "student":
        return teacher.module["encoder"], "teacher"
    return method.encoder, "student"


def export(
    ckpt_path: str | Path, out: str | Path, img_size: int | None = None, weights: str = "auto"
) -> Path:
    """Write the export folder OUT (config.json, model.safetensors, split_head.safetensors); -> OUT.
    weights: teacher | student | auto (the teacher where the method has one)."""
    from timm.models._hub import save_config_for_hf

    out = Path(out)
    if out.suffix == ".safetensors":
        raise ExportError(
            f"--out {out}: an export is a folder now (timm's local-dir), e.g. --out {out.with_suffix('')}"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    method, ckpt = load_method(ckpt_path)
    encoder, which = exported_encoder(method, weights)
    model = timm_backbone(encoder, img_size, "--img-size")
    size = model.patch_embed.img_size
    data = ckpt["config"]["data"]
    data_config = {
        "input_size": (3, *size),
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT,
    }
    provenance = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "step": ckpt.get("step"),
        "preset": ckpt["config"].get("preset"),
        "method": ckpt["config"]["model"]["method"],
        "family": ckpt["config"]["model"].get("family", "vicreg"),
        "weights": which,
        "git_sha": ckpt.get("git_sha"),
        "trained_img_size": encoder.timm_kwargs["img_size"],
        "head": {
            "file": HEAD,
            "d_patch": encoder.d_patch,
            "d_inv": encoder.d_inv,
            "d_eq": encoder.d_eq,
            "pool": encoder.pool,
            "split": "z = head(tokens); z[..., :d_inv] invariant, z[..., d_inv:] equivariant",
        },
    }
    head = {k: v.detach().contiguous() for k, v in encoder.head.state_dict().items()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Each file is written beside its final name and renamed, so a failed export never leaves a
        # half-written file that timm would pick up.
        _atomic(out / WEIGHTS, lambda tmp: save_file(model.state_dict(), str(tmp), metadata={"format": "pt"}))
        _atomic(out / HEAD, lambda tmp: save_file(head, str(tmp), metadata={"d_inv": str(encoder.d_inv)}))
        _atomic(
            out / CONFIG,
            lambda tmp: save_config_for_hf(
                model, str(tmp), model_config={"eqrecon": provenance}, data_config=data_config
            ),
        )
    except OSError as err:
        raise ExportError(f"--out {out}: cannot write the export ({err.strerror or err})") from None
    check_roundtrip(out, model)
    return out


def _atomic(path: Path, write) -> None:
    """write(tmp) beside `path`, then rename it onto `path` (no partial file on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_roundtrip(out: Path, model: nn.Module) -> None:
    """timm must load exactly the exported tensors and compute the same features from them."""
    loaded = load_export(out)
    got, want = loaded.state_dict(), model.state_dict()
    differ = sorted(k for k in want if k not in got or not torch.equal(want[k], got[k]))
    if differ or set(got) != set(want):
        raise ExportError(f"timm loaded {out} differently: {differ[:5] or sorted(set(got) ^ set(want))[:5]}")
    x = torch.randn(1, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(loaded(x), model(x)):  # e.g. a pooling setting config.json did not keep
            raise ExportError(f"timm's model from {out} computes other features than the exported one")


# ------------------------------------------------------------------------------------ reading


def read_config(folder: str | Path) -> dict:
    """An export's config.json (timm's fields plus "eqrecon": checkpoint, step, method, head split)."""
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable export config ({err})") from None


def load_export(folder: str | Path, img_size: int | None = None) -> nn.Module:
    """The exported timm model in eval mode (timm's `local-dir:` load, strict); ExportError if unreadable.

    img_size other than the exported size: the position embedding is resampled (`set_img_size`).
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ExportError(
            f"{folder}: not an export folder (needs {CONFIG} and {WEIGHTS}; write one with train/export.py)"
        )
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except (SafetensorError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder}: damaged export file ({err})") from None
    except KeyError as err:  # a config.json without "architecture" or "pretrained_cfg"
        raise ExportError(
            f"{folder / CONFIG}: missing entry {err} (re-export with train/export.py)"
        ) from None
    except RuntimeError as err:  # timm's strict load_state_dict (it names the keys), or "Unknown model"
        reason = " ".join(str(err).split())
        raise ExportError(f"{folder}: weights do not match {CONFIG} ({reason[:400]})") from None
    if img_size:
        set_img_size(model, img_size, "img_size")
    return model


def load_split_head(folder: str | Path) -> tuple[nn.Linear, int]:
    """(head, d_inv) of an export: z = head(features), z[..., :d_inv] invariant, z[..., d_inv:] equivariant."""
    path = Path(folder) / HEAD
    if not path.is_file():
        raise ExportError(f"{path}: no split head in this export (write one with train/export.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            d_inv = int((f.metadata() or {})["d_inv"])
        d_out, d_in = state["weight"].shape
    except (SafetensorError, KeyError, ValueError) as err:
        raise ExportError(f"{path}: damaged split head ({err})") from None
    head = nn.Linear(d_in, d_out)
    head.load_state_dict(state, strict=True)
    return head.eval(), d_inv


# ---------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="training checkpoint, e.g. runs/demo/ckpt/last.pt")
    parser.add_argument("--out", required=True, help="export folder, e.g. runs/demo/backbone")
    parser.add_argument(
        "--img-size", type=int, default=0, help="input size to export at (default: the trained one)"
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS_CHOICES,
        default="auto",
        help="the DINO family's teacher (auto's choice for it) or student encoder",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.img_size or None, args.weights)
    except UserError as err:
        print(one_line(err), file=sys.stderr)
        return err.exit_code
    cfg = json.loads((out / CONFIG).read_text())
    print(
        f"backbone: {out} ({cfg['architecture']}, {cfg['model_args']}); "
        f'timm.create_model("local-dir:{out}", pretrained=True)'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
