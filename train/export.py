"""Export a trained backbone for timm: safetensors with timm's key names plus a JSON beside it.

    python train/export.py --ckpt runs/demo/ckpt/last.pt --out backbone.safetensors [--with-head]

writes backbone.safetensors and backbone.json ({"timm_name", "timm_kwargs", ...}); then

    meta = json.load(open("backbone.json"))
    model = timm.create_model(meta["timm_name"], pretrained=True, num_classes=0, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(file="backbone.safetensors"))

loads every key (timm relaxes its strict check whenever num_classes differs from the pretrained
config's; adding num_classes=0 to the overlay keeps it strict). --with-head also writes the linear
token head to backbone.head.safetensors, a separate file so the timm load stays exact; the JSON
records its split (z[..., :d_inv] invariant, z[..., d_inv:] equivariant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/export.py` from anywhere

import timm
import torch
from safetensors.torch import save_file

from pipeline.errors import ExportError
from train.config import from_dict


def load_method(ckpt_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the trained method from a checkpoint written by train.loop; -> (method, checkpoint)."""
    from model import build_method

    path = Path(ckpt_path)
    if not path.is_file():
        raise ExportError(f"--ckpt {path}: no such checkpoint (runs keep it at RUN/ckpt/last.pt)")
    # Our own training checkpoint (it holds RNG states), hence not weights_only.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ExportError(f"{path} is not an eqrecon training checkpoint (no 'model'/'config' entries)")
    cfg = from_dict(ckpt["config"])
    method = build_method(cfg.model, cfg.data)
    method.load_state_dict(ckpt["model"])
    return method.eval(), ckpt


def timm_kwargs(encoder) -> dict:
    """The kwargs that recreate the backbone; num_classes is left to the caller (0 = features)."""
    return {k: v for k, v in encoder.timm_kwargs.items() if k != "num_classes"}


def create_from_export(out: str | Path, strict_overlay: bool = True) -> torch.nn.Module:
    """The documented timm call on an export (with num_classes=0 in the overlay when strict_overlay)."""
    out = Path(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    overlay = {"file": str(out), **({"num_classes": 0} if strict_overlay else {})}
    return timm.create_model(meta["timm_name"], pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                             **meta["timm_kwargs"])


def export(ckpt_path: str | Path, out: str | Path, with_head: bool = False) -> dict:
    """Write OUT (.safetensors), OUT's .json and optionally OUT's .head.safetensors; returns the JSON."""
    method, ckpt = load_method(ckpt_path)
    encoder, out = method.encoder, Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: use a .safetensors file name (timm picks the reader by suffix)")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", "timm_name": encoder.timm_name})
    meta = {
        "timm_name": encoder.timm_name,
        "timm_kwargs": timm_kwargs(encoder),
        "file": out.name,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "step": ckpt.get("step"),
        "preset": ckpt["config"].get("preset"),
        "method": ckpt["config"]["model"]["method"],
        "git_sha": ckpt.get("git_sha"),
        "mean": list(ckpt["config"]["data"]["mean"]),
        "std": list(ckpt["config"]["data"]["std"]),
    }
    if with_head:
        head_file = out.with_name(out.stem + ".head.safetensors")
        save_file({k: v.detach().contiguous() for k, v in encoder.head.state_dict().items()}, str(head_file))
        meta["head"] = {"file": head_file.name, "d_patch": encoder.d_patch, "d_inv": encoder.d_inv,
                        "d_eq": encoder.d_eq, "pool": encoder.pool,
                        "split": "z = head(patch tokens); z[..., :d_inv] invariant, z[..., d_inv:] equivariant"}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    check_roundtrip(out, state)
    return meta


def check_roundtrip(out: Path, state: dict) -> None:
    """timm must hold exactly the exported tensors: same key set, same values."""
    model = create_from_export(out)
    got = model.state_dict()
    missing, extra = sorted(set(state) - set(got)), sorted(set(got) - set(state))
    if missing or extra:
        raise ExportError(f"timm's {type(model).__name__} does not match the export: keys only in the export "
                          f"{missing[:5]}, only in timm {extra[:5]}")
    differ = [k for k in state if not torch.equal(state[k], got[k])]
    if differ:
        raise ExportError(f"timm loaded different values for {differ[:5]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training checkpoint, e.g. runs/demo/ckpt/last.pt")
    parser.add_argument("--out", required=True, help="backbone file, e.g. backbone.safetensors")
    parser.add_argument("--with-head", action="store_true", help="also write the linear head and its split")
    args = parser.parse_args(argv)
    try:
        meta = export(args.ckpt, args.out, args.with_head)
    except (ExportError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"backbone: {args.out} ({meta['timm_name']}, {meta['timm_kwargs']}); "
          f"metadata: {Path(args.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
