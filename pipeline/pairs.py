"""The equivariance probe's pairs (x, x'): rendered once with `pipeline.path`'s θ semantics by the
reference renderer, then embedded by every backbone that is probed (the backbone, its random-init
twin, raw pixels), so all of them see exactly the same images and θ.

Per transformation family, each source image gives `per_image` pairs, each with its own θ drawn from
the protocol's ranges (a `PathConfig`, pixels at `ref_size` scaled to the probe resolution):

    rotation, translation, color, blur:  x = the centre view (largest centred square), x' = g_θ(x)
                                         with only that family active
    crop:  x = the whole image (squashed to a square), x' = an A2 crop (unflipped)
    flip:  x = the whole image, x' = an A2 crop, mirrored when flip2 = 1

`render_family` runs g once per pair and paints each mask on the result; `masks_for` says which masks a
family is probed under and `anchor_key` which families share their anchor view x1 (embedded once).

Targets (`targets`): the family's θ entries (`pipeline.path.FAMILY_FIELDS`) as
    signed   the entries themselves: rotation φ in degrees (sign = direction), translation (tx, ty) px,
             colour (δb, δc, δs, δh), blur σ, crop (y0, x0, h, w), flip 0/1;
    abs      their magnitudes |·| (rotation: how much, not which way);
    sincos   rotation only: (sin φ, cos φ), the parameterisation that has no wrap-around; other
             families fall back to signed.

Leaks removed here, because they let a probe read θ without the content:
  - the affine fill: a rotated or shifted square has fill-coloured corners whose extent is |φ|;
    `mask="disc"` paints everything outside the central disc (radius size/2) grey in x and x', so a
    rotation about the centre moves content only inside the disc and the corners say nothing;
  - 90°-symmetric images (chessboards, radial textures): φ and φ ± 90° look alike, the target is
    ambiguous; `symmetry_score` measures it and `drop_symmetric` excludes such images;
  - the split: `groups` name the source photo of each pair, and the probe holds out by group, so two
    crops of one photo never sit on both sides of the train/test split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from pipeline.oracle import apply_g, crop_resize, decode
from pipeline.path import FAMILIES, FAMILY_FIELDS, IDX, PathConfig, sample_theta

TRANSFORMS = ("rotation", "translation", "color", "blur", "crop", "flip")
TARGETS = ("signed", "abs", "sincos")
MASKS = ("disc", "none")
FILL_FAMILIES = ("rotation", "translation")  # g leaves fill-coloured corners whose extent tells θ
MASK_FILL = 0.5  # grey, in [0, 1] pixel space
SYMMETRY_THRESHOLD = 0.6  # |corr(x, rot90(x))| above this: the image is (nearly) 90°-symmetric
WHOLE = torch.tensor([0.0, 0.0, 1.0, 1.0])


def anchor_of(family: str) -> str:
    """Which view x of the image a family's pairs start from: "centre" for g, "whole" for crop/flip."""
    return "whole" if family in ("crop", "flip") else "centre"


def centre_box(hw: tuple[int, int]) -> torch.Tensor:
    """The largest centred square of an (H, W) image as a fractional box (y0, x0, h, w)."""
    h, w = hw
    side = min(h, w)
    return torch.tensor([(h - side) / 2 / h, (w - side) / 2 / w, side / h, side / w])


def anchor_view(img: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the "centre" or "whole" view (3, size, size) in [0, 1]."""
    box = centre_box(tuple(img.shape[-2:])) if kind == "centre" else WHOLE
    return crop_resize(img, box, False, size)


def disc_mask(size: int) -> torch.Tensor:
    """(size, size) bool: pixel centres inside the disc of radius size/2 about the image centre."""
    c = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= (size / 2) ** 2


def apply_mask(images: torch.Tensor, mask: str) -> torch.Tensor:
    """(B, 3, S, S) -> the same with everything outside the central disc set to MASK_FILL ("disc")."""
    if mask == "none":
        return images
    inside = disc_mask(images.shape[-1]).to(images.device)
    return torch.where(inside, images, torch.full_like(images, MASK_FILL))


def symmetry_score(view: torch.Tensor) -> float:
    """How 90°-symmetric an image is: max over ±90° of |Pearson corr(x, rot90(x))| of its grey
    levels inside the central disc. (3, S, S) in [0, 1] -> [0, 1]; natural photos score ~0-0.4,
    a chessboard ~1 (its 90° rotation is itself or its negative)."""
    grey = view.float().mean(0)  # (S, S)
    inside = disc_mask(grey.shape[-1])
    best = 0.0
    for k in (1, 3):
        a, b = grey[inside], torch.rot90(grey, k)[inside]
        a, b = a - a.mean(), b - b.mean()
        denom = float(a.norm() * b.norm())
        best = max(best, abs(float((a * b).sum())) / denom if denom > 0 else 1.0)
    return best


def drop_symmetric(
    samples: list[tuple[bytes, int]], size: int, threshold: float = SYMMETRY_THRESHOLD
) -> tuple[list[tuple[bytes, int]], list[int]]:
    """Samples whose centre view scores below `threshold` on `symmetry_score`, and the indices dropped."""
    keep, dropped = [], []
    for i, (jpg, label) in enumerate(samples):
        if symmetry_score(anchor_view(decode(jpg, key=f"#{i}"), "centre", size)) > threshold:
            dropped.append(i)
        else:
            keep.append((jpg, label))
    return keep, dropped


@dataclass
class PairSet:
    """One family's rendered pairs. Images are float16 in [0, 1] (half the memory; 8-bit sources)."""

    family: str
    x1: torch.Tensor  # (M, 3, S, S) the anchor view of each source image
    x2: torch.Tensor  # (N, 3, S, S) the second image of each pair
    anchor: torch.Tensor  # (N,) int64: row of x1 that pair i starts from
    theta: torch.Tensor  # (N, p) the family's θ entries (FAMILY_FIELDS order, θ units)
    groups: torch.Tensor  # (N,) int64: source photo of each pair (the probe's split unit)

    def __len__(self) -> int:
        return len(self.x2)


def masks_for(family: str, masks: tuple[str, ...]) -> tuple[str, ...]:
    """The masks a family is probed under: every one for the families whose g leaves a fill
    (FILL_FAMILIES: the corner cue the disc removes), the first for colour and blur (no fill), none
    for crop and flip (their pairs are crops of the whole image, never masked)."""
    if family not in FAMILIES:
        return ("none",)
    return tuple(masks) if family in FILL_FAMILIES else tuple(masks[:1])


def anchor_key(family: str, mask: str) -> str:
    """Which rendering a family's x1 is: families with equal keys share identical anchor images, so a
    probe embeds each anchor once (e.g. "centre/disc" for rotation, translation, colour and blur)."""
    return f"{anchor_of(family)}/{mask if family in FAMILIES else 'none'}"


def render_family(
    samples: list[tuple[bytes, int]],
    family: str,
    cfg: PathConfig,
    size: int,
    per_image: int,
    groups: list[int] | None = None,
    seed: int = 0,
    masks: tuple[str, ...] = ("disc",),
    device: torch.device | None = None,
) -> dict[str, PairSet]:
    """Render `per_image` pairs of `family` for every sample -> {mask: PairSet}; deterministic in `seed`.

    g_θ runs once per pair, whatever the number of masks: the masks only paint the rendered images
    (so every mask's pairs have the same θ and content). groups: the source photo of each sample
    (default: each sample its own). g runs on `device` (the GPU when probing there: it is the costly
    step); decoding and cropping stay on the CPU. Crop and flip take no mask: pass ("none",).
    """
    if family not in TRANSFORMS:
        raise ValueError(f"unknown transformation {family!r}; choose from {', '.join(TRANSFORMS)}")
    bad = [m for m in masks if m not in MASKS]
    if bad or not masks:
        raise ValueError(f"unknown mask {bad[0] if bad else None!r}; choose from {', '.join(MASKS)}")
    if family not in FAMILIES and tuple(masks) != ("none",):
        raise ValueError(f"{family} pairs are never masked; pass masks=('none',)")
    fields = [IDX[name] for name in FAMILY_FIELDS[family]]
    # Only this family's g is active (crop/flip activate none: they live in the A2 part of θ).
    cfg = replace(cfg, transforms=(family,) if family in FAMILIES else ())
    gen = torch.Generator().manual_seed(seed * 1000 + TRANSFORMS.index(family))
    x1 = {m: [] for m in masks}
    x2 = {m: [] for m in masks}
    thetas = []
    for i, (jpg, _) in enumerate(samples):
        img = decode(jpg, key=f"#{i}")  # (3, H, W) uint8
        theta = sample_theta(cfg, torch.tensor([list(img.shape[-2:])] * per_image), gen)  # (n, P)
        x = anchor_view(img, anchor_of(family), size)
        if family in FAMILIES:  # x' = g_θ(x)
            batch = x[None].expand(per_image, -1, -1, -1).to(device or x.device).contiguous()
            pair = apply_g(batch, theta, cfg)
            for m in masks:
                x1[m].append(apply_mask(x[None], m)[0].half())
                x2[m].append(apply_mask(pair, m).cpu().half())
        else:  # crop / flip: x' = an A2 crop of the source, mirrored when flip2 = 1 (flip only)
            boxes = theta[:, IDX["crop2_y0"] : IDX["crop2_w"] + 1]
            flips = (
                theta[:, IDX["flip2"]] > 0.5 if family == "flip" else torch.zeros(per_image, dtype=torch.bool)
            )
            x1["none"].append(x.half())
            x2["none"].append(
                torch.stack([crop_resize(img, b, f, size) for b, f in zip(boxes, flips)]).half()
            )
        thetas.append(theta[:, fields])
    n = len(samples)
    group_of = torch.tensor(groups if groups is not None else range(n), dtype=torch.int64)
    anchor = torch.arange(n).repeat_interleave(per_image)
    theta_all = torch.cat(thetas)
    return {
        m: PairSet(family, torch.stack(x1[m]), torch.cat(x2[m]), anchor, theta_all, group_of[anchor])
        for m in masks
    }


def targets(family: str, theta: torch.Tensor, kind: str = "signed") -> torch.Tensor:
    """The regression target of a family's θ entries (N, p) -> (N, q); see the module docstring."""
    if kind not in TARGETS:
        raise ValueError(f"unknown target {kind!r}; choose from {', '.join(TARGETS)}")
    theta = theta.float()
    if kind == "abs":
        return theta.abs()
    if kind == "sincos" and family == "rotation":
        phi = torch.deg2rad(theta[:, 0])
        return torch.stack([phi.sin(), phi.cos()], dim=1)
    return theta


def batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """(N, ...) -> consecutive (≤ batch_size, ...) slices."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]
