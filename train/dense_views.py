"""What the dense probes see: per-patch feature maps of square windows, and how window outputs are put
back together at the label's size.

The view rule (one rule for every task and every model): an image is resized (bilinear, antialiased)
so that its short side is S, the probe resolution; S×S windows tile the resized image with stride
`stride` along both axes, the last window flush with the edge (`slide`; one window when the image is
square), or the whole image is resized to S×S (`resize`). A model maps a window (3, S, S) in [0, 1] to
a feature map (D, S/p, S/p). A head's window outputs are upsampled bilinearly to S×S, averaged where
windows overlap, and the resized canvas is upsampled bilinearly to the label's own size.

Models: `DenseEncoder` (a backbone's patch tokens, the last or last-4 layers, final norm applied),
`PatchPixels` (each patch's raw pixels, 3·p² channels) and `Constant` (ones: a chance-level floor).
The random-init twin is train.probe_embed.random_twin of a DenseEncoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dense_data import DenseSet, Pair, read_image
from pipeline.errors import ProbeError
from train.backbones import Backbone

VIEWS = ("slide", "resize")


class DenseEncoder(nn.Module):
    """A frozen timm ViT: (B, 3, S, S) in [0, 1] -> (B, layers·D, S/p, S/p) patch tokens, prefix dropped."""

    def __init__(self, bb: Backbone, layers: int = 1):
        super().__init__()
        if layers < 1 or layers > len(getattr(bb.model, "blocks", ())):
            raise ProbeError(f"--layers {layers}: the backbone has {len(bb.model.blocks)} blocks")
        self.model, self.layers, self.prefix = bb.model.eval(), layers, bb.num_prefix_tokens
        self.patch = bb.model.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(bb.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(bb.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        g = x.shape[-1] // self.patch
        if self.layers == 1:  # forward_features: every timm ViT has it; the final norm is applied
            tokens = self.model.forward_features(x)[:, self.prefix :]  # (B, N, D)
            return tokens.transpose(1, 2).reshape(len(x), -1, g, g)
        # The last `layers` blocks' outputs, each through the final norm, as DINOv2's "last 4" heads.
        maps = self.model.forward_intermediates(
            x, indices=self.layers, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return torch.cat(maps, dim=1)  # (B, layers·D, g, g)


class PatchPixels(nn.Module):
    """The raw-pixel feature: (B, 3, S, S) -> (B, 3·p², S/p, S/p), each patch's pixels."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x.float(), self.patch)


class Constant(nn.Module):
    """The same feature everywhere: (B, 3, S, S) -> ones (B, 1, S/p, S/p); no probe can beat chance on it."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.shape[-1] // self.patch
        return x.new_ones(len(x), 1, g, g)


# ------------------------------------------------------------------------------------------ windows


def resized_size(hw: tuple[int, int], size: int, view: str) -> tuple[int, int]:
    """The canvas an image of size hw is resized to: short side `size` (slide) or size×size (resize)."""
    if view == "resize":
        return size, size
    h, w = hw
    s = size / min(h, w)
    return max(size, round(h * s)), max(size, round(w * s))


def _starts(length: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def windows(canvas: tuple[int, int], size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the size×size windows tiling a canvas (H, W) >= size, last ones flush."""
    return [(y, x) for y in _starts(canvas[0], size, stride) for x in _starts(canvas[1], size, stride)]


def resize(t: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, *hw): bilinear antialiased for images, nearest for labels."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    if mode == "nearest":
        return F.interpolate(t[None].float(), size=hw, mode="nearest-exact")[0].to(t.dtype)
    return F.interpolate(t[None].float(), size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


@dataclass
class Item:
    """One image of a split: its label at full size, and its windows on the resized canvas."""

    pair: Pair
    label: torch.Tensor  # (H, W): int64 class indices or float32 metres, the label's own size
    canvas: tuple[int, int]
    corners: list[tuple[int, int]]

    def window_labels(self, size: int) -> torch.Tensor:
        """The label resized (nearest) to the canvas and cut into windows -> (n_windows, S, S)."""
        lab = resize(self.label[None], self.canvas, "nearest")[0]
        return torch.stack([lab[y : y + size, x : x + size] for y, x in self.corners])


def load_items(ds: DenseSet, split: str, size: int, stride: int, view: str, limit: int = 0) -> list[Item]:
    """The split's labels (decoded and checked against their images) and window layout."""
    from pipeline.dense_data import read_depth, read_mask

    pairs = getattr(ds, split)[: limit or None]
    items = []
    for pair in pairs:
        hw = tuple(read_image(pair.image).shape[1:])
        label = (read_mask if ds.kind == "seg" else read_depth)(pair.label, hw, ds)
        canvas = resized_size(hw, size, view)
        items.append(Item(pair, label, canvas, windows(canvas, size, stride)))
    return items


def window_images(item: Item, size: int) -> torch.Tensor:
    """The item's image resized to its canvas and cut into windows -> (n_windows, 3, S, S) in [0, 1]."""
    image = resize(read_image(item.pair.image).float() / 255, item.canvas, "bilinear").clamp(0, 1)
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in item.corners])


@torch.no_grad()
def embed_items(
    model: nn.Module, items: list[Item], size: int, device: torch.device, batch: int = 64
) -> list[torch.Tensor]:
    """model's feature maps of every item's windows -> [(n_windows, D, g, g) float16 on the CPU]."""
    model = model.to(device).eval()
    crops, owner = [], []
    out: list[list[torch.Tensor]] = [[] for _ in items]

    def flush():
        feats = model(torch.stack(crops).to(device)).half().cpu()
        for i, f in zip(owner, feats):
            out[i].append(f)
        crops.clear(), owner.clear()

    for i, item in enumerate(items):
        for crop in window_images(item, size):
            crops.append(crop)
            owner.append(i)
            if len(crops) == batch:
                flush()
    if crops:
        flush()
    return [torch.stack(f) for f in out]


def assemble(maps: torch.Tensor, item: Item, size: int) -> torch.Tensor:
    """Window outputs (n_windows, C, g, g) -> (C, H, W) at the label's size: each upsampled to S×S,
    averaged where windows overlap on the canvas, the canvas upsampled to the label's size."""
    up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    canvas = up.new_zeros(up.shape[1], *item.canvas)
    count = up.new_zeros(1, *item.canvas)
    for (y, x), m in zip(item.corners, up):
        canvas[:, y : y + size, x : x + size] += m
        count[:, y : y + size, x : x + size] += 1
    canvas = canvas / count
    if tuple(canvas.shape[1:]) == tuple(item.label.shape):
        return canvas
    return F.interpolate(canvas[None], size=tuple(item.label.shape), mode="bilinear", align_corners=False)[0]
