"""torch.hub entry point for an exported eqrecon backbone (a `train/export.py` folder).

    model = torch.hub.load(REPO, "eqrecon_backbone", path="runs/demo/backbone", source="local")
    model, head, d_inv = torch.hub.load(REPO, "eqrecon_backbone", path=..., with_head=True, source="local")

REPO is a clone of this repository. The model is the same timm model that
`timm.create_model("local-dir:PATH", pretrained=True)` gives, in eval mode: `model(x)` returns the
pooled features eqrecon trained; `head(model(x))[:, :d_inv]` is z_inv, the rest z_eq.
"""

from __future__ import annotations

dependencies = ["torch", "timm", "safetensors"]


def eqrecon_backbone(path: str, with_head: bool = False):
    """The exported timm ViT in eval mode; with_head=True: (model, split head, d_inv)."""
    from train.export import load_export, load_split_head

    model = load_export(path)
    if not with_head:
        return model
    head, d_inv = load_split_head(path)
    return model, head, d_inv
