"""Multi-crop for the DINO family: two global crops and L local crops per sample, and iBOT's masks.

    mc = MULTICROP["ibot"]                                   # or MultiCropConfig(n_local=..., ...)
    data = global_data_config(data, mc)                      # the global crops' size and scale
    crops = sample_multicrop(key, src_hw, data, mc, epoch)   # θ, local params, masks: the one owner
    view1, view2, targets = oracle.make_views(img, crops.theta, data)
    local = render_local_crops(img, crops.local, mc, data)  # (L, 3, h, w), normalised like the views
    batch = with_multicrop(batch, local, masks)              # Batch.local, Batch.masks

Global crops. Global crop 1 is view 1 and global crop 2 is view 2 of the path pipeline (pipeline.path):
their boxes are θ's crop1 and crop2, drawn by `path.sample_theta` at `global_size` with area scale
`global_scale`; the augmentation path g_θ and its K intermediate targets act on global crop 2 only. The
global crops get no other photometric augmentation (DINO's colour jitter, blur and solarisation of the
global crops are left out: on global crop 2 they would be transformations outside θ that the path
targets do not follow; on global crop 1 the path paper's views are plain crops).

Local crops follow DINO's `DataAugmentationDINO` (facebookresearch/dino, main_dino.py) for its local
transform, in this order:
    RandomResizedCrop(local_size, scale=local_scale, ratio=(3/4, 4/3))   the rule of path.sample_crop
    RandomHorizontalFlip(p=0.5)
    RandomApply(ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), p=0.8)
    RandomGrayscale(p=0.2)
    GaussianBlur(p=0.5, σ ~ U(0.1, 2.0) output pixels)
    Normalize(data.mean, data.std)
Three deliberate differences, so that DALI can render the same crops (the parity tests hold them):
the resize is bilinear antialiased (as the views; DINO's is bicubic); the jitter's four operations run
in the fixed order brightness, contrast, saturation, hue (torchvision's ColorJitter permutes them per
image); the blur is a true Gaussian with kernel 2·ceil(3σ)+1 and reflect padding (PIL's radius-σ blur
is an extended box-blur approximation of it).

Local parameters. One row per local crop, `LOCAL_FIELDS`: the θ layout of pipeline.path (crop1/flip1 are
the local crop's box and flip, the colour and blur entries the jitter and blur, rotation and translation
0, crop2/flip2 a whole-image box, unused) plus a greyscale flag. So the renderers apply the local
photometric steps with g's own colour and blur code (`oracle.apply_g`, `dali_ops.apply_g`): one
definition of those semantics for views, targets and local crops.

Randomness. Like θ, everything a sample gets depends only on (seed, epoch, key): θ from the reference
loader's generator (`oracle.sample_theta_for`, so wiring multi-crop in leaves θ unchanged), the local
parameters and the masks from generators of their own.

Masks. iBOT's block masks (pipeline/masks.py) of the two global crops' (global_size / patch_size)²
patch tokens, each crop with its own ratio from {0, U(0.1, 0.5)} -> (2, N) bool, row-major patches.
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F

from pipeline.batch import Batch, DataConfig, MultiCropConfig  # the config lives beside DataConfig
from pipeline.errors import ConfigError
from pipeline.masks import block_masks

# The calls into the view pipeline, kept in one place (pipeline/reference.py owns the pixel semantics).
from pipeline.oracle import apply_g, crop_resize, make_views, normalize, sample_theta_for, seed_of
from pipeline.path import CROP1, CROP2, IDX, THETA_DIM, THETA_FIELDS, PathConfig, sample_crop

LOCAL_FIELDS = (*THETA_FIELDS, "grey")
GREY = len(THETA_FIELDS)  # index of the greyscale flag
LOCAL_DIM = len(LOCAL_FIELDS)
COLOUR = ("brightness", "contrast", "saturation", "hue")


# The recipes' multi-crop settings: iBOT and DINOv2 as the `path` paper trains them (issue 12), DINO as
# facebookresearch/dino's defaults (global 0.4-1, local 0.05-0.4, 8 local crops).
MULTICROP = {
    "dino": MultiCropConfig(
        enabled=True, n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), masks=False
    ),
    "ibot": MultiCropConfig(enabled=True, n_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25)),
    "dinov2": MultiCropConfig(enabled=True, n_local=8, global_scale=(0.32, 1.0), local_scale=(0.05, 0.32)),
}


def validate(mc: MultiCropConfig) -> None:
    """One ConfigError line naming the multicrop field at fault."""
    if mc.n_local < 0:
        raise ConfigError(f"multicrop.n_local must be >= 0, got {mc.n_local}")
    for name in ("global_size", "local_size", "patch_size"):
        if getattr(mc, name) < 1:
            raise ConfigError(f"multicrop.{name} must be >= 1, got {getattr(mc, name)}")
    for name in ("global_size", "local_size"):  # the encoder cuts every crop into whole patches
        if getattr(mc, name) % mc.patch_size:
            raise ConfigError(
                f"multicrop.{name}={getattr(mc, name)} is not a multiple of the patch size "
                f"multicrop.patch_size={mc.patch_size} (model.patch_size)"
            )
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(mc, name)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"multicrop.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
    if not 0 < mc.crop_ratio[0] <= mc.crop_ratio[1]:
        raise ConfigError(f"multicrop.crop_ratio must satisfy 0 < lo <= hi, got {mc.crop_ratio}")
    for name in ("flip_p", "jitter_p", "grey_p", "blur_p"):
        if not 0 <= getattr(mc, name) <= 1:
            raise ConfigError(f"multicrop.{name} is a probability, got {getattr(mc, name)}")
    for name in ("brightness", "contrast", "saturation"):
        if not 0 <= getattr(mc, name) < 1:
            raise ConfigError(
                f"multicrop.{name} must be in [0, 1) (factor 1 + δ stays positive), got {getattr(mc, name)}"
            )
    if not 0 <= mc.hue <= 0.5:
        raise ConfigError(f"multicrop.hue must be in [0, 0.5], got {mc.hue}")
    if not 0.1 <= mc.blur_sigma[0] <= mc.blur_sigma[1]:  # below 0.1 g's blur is the identity
        raise ConfigError(f"multicrop.blur_sigma must satisfy 0.1 <= lo <= hi, got {mc.blur_sigma}")


def global_data_config(data: DataConfig, mc: MultiCropConfig) -> DataConfig:
    """The DataConfig whose views are the two global crops: img_size = global_size, crop scale =
    global_scale, multicrop = mc; everything else (g_θ, K, targets, normalisation) as configured."""
    validate(mc)
    return dataclasses.replace(
        data,
        img_size=mc.global_size,
        multicrop=mc,
        aug=dataclasses.replace(data.aug, crop_scale=tuple(mc.global_scale)),
    )


# ---------------------------------------------------------------------------------------------------
# Sampling: the one owner of the rule, read by both renderers


def local_crop_config(mc: MultiCropConfig) -> PathConfig:
    """The random-resized-crop rule of the local crops, as path.sample_crop (and dali_ops.sample_crop) read it."""
    return PathConfig(crop_scale=tuple(mc.local_scale), crop_ratio=tuple(mc.crop_ratio))


def sample_local_params(mc: MultiCropConfig, src_hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Boxes, flips and photometric parameters of one sample's L local crops -> (L, LOCAL_DIM) float32.

    Every number is drawn whether or not its step is applied, so changing one probability does not
    change the other draws for the same seed.
    """
    L = mc.n_local

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(L, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(L, generator=gen, dtype=torch.float64) < p).double()

    params = torch.zeros(L, LOCAL_DIM, dtype=torch.float64)
    jitter = coin(mc.jitter_p)
    for name in COLOUR:
        half = getattr(mc, name)
        params[:, IDX[name]] = jitter * uniform(-half, half)
    params[:, IDX["blur_sigma"]] = coin(mc.blur_p) * uniform(*mc.blur_sigma)  # 0: no blur
    params[:, IDX["flip1"]] = coin(mc.flip_p)
    params[:, GREY] = coin(mc.grey_p)
    # the box last: its number of draws varies (up to 10 tries), which must not shift the draws above
    params[:, CROP1] = sample_crop(
        local_crop_config(mc), torch.tensor([src_hw] * L, dtype=torch.float64), gen
    )
    params[:, CROP2] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # unused: the whole image
    return params.float()


def sample_masks(mc: MultiCropConfig, *seed_parts) -> torch.Tensor:
    """iBOT's masks of the two global crops, drawn from a generator seeded by seed_parts -> (2, N) bool."""
    grid = (mc.global_size // mc.patch_size,) * 2
    return block_masks(2, grid, random.Random(seed_of("masks", *seed_parts)))


class MultiCropParams(NamedTuple):
    """Everything random about one sample's crops."""

    theta: torch.Tensor  # (P,) the path's θ; its crop1/crop2 are the global crops' boxes
    local: torch.Tensor  # (L, LOCAL_DIM) the local crops' parameters
    masks: torch.Tensor | None  # (2, N) bool iBOT masks, None unless mc.masks


def sample_multicrop(
    key: str, src_hw: tuple[int, int], data: DataConfig, mc: MultiCropConfig, epoch: int
) -> MultiCropParams:
    """Every random choice for sample `key` (source size src_hw) in `epoch`; depends on (seed, epoch, key)
    only. `data` is the global crops' config (`global_data_config`)."""
    theta = sample_theta_for(key, src_hw, data, epoch)
    gen = torch.Generator().manual_seed(seed_of("local", data.seed, epoch, key))
    masks = sample_masks(mc, data.seed, epoch, key) if mc.masks else None
    return MultiCropParams(theta, sample_local_params(mc, src_hw, gen), masks)


# ---------------------------------------------------------------------------------------------------
# Rendering (PyTorch reference)


def photometric_configs(mc: MultiCropConfig) -> tuple[PathConfig, PathConfig]:
    """The g configs the local crops' colour step and blur step run under (σ in local-crop pixels)."""
    return PathConfig(transforms=("color",)), PathConfig(transforms=("blur",), ref_size=mc.local_size)


def render_local_crops(
    image: torch.Tensor, params: torch.Tensor, mc: MultiCropConfig, data: DataConfig
) -> torch.Tensor:
    """One sample's local crops: (3, H, W) uint8, params (L, LOCAL_DIM) -> (L, 3, h, w) float32, normalised
    with data.mean/std like the views. Crop + flip -> colour jitter -> greyscale -> blur (module docstring)."""
    if params.dim() != 2 or params.shape[1] != LOCAL_DIM:
        raise ValueError(f"render_local_crops: params must be (L, {LOCAL_DIM}), got {tuple(params.shape)}")
    h = mc.local_size
    if params.shape[0] == 0:
        return torch.zeros(0, 3, h, h, device=image.device)
    params = params.to(image.device, torch.float32)
    x = torch.stack([crop_resize(image, p[CROP1], p[IDX["flip1"]] > 0.5, h) for p in params])  # (L, 3, h, h)
    colour, blur = photometric_configs(mc)
    # oracle.apply_g applies whatever θ holds, so each step gets a θ holding only its own entries
    theta_colour = torch.zeros(params.shape[0], THETA_DIM, device=image.device)
    theta_colour[:, IDX["brightness"] : IDX["hue"] + 1] = params[:, IDX["brightness"] : IDX["hue"] + 1]
    x = apply_g(x, theta_colour, colour)
    grey = params[:, GREY] > 0.5
    x[grey] = F.rgb_to_grayscale(x[grey], num_output_channels=3)
    theta_blur = torch.zeros_like(theta_colour)
    theta_blur[:, IDX["blur_sigma"]] = params[:, IDX["blur_sigma"]]
    x = apply_g(x, theta_blur, blur)
    return normalize(x, data)


# ---------------------------------------------------------------------------------------------------
# Collate


def with_multicrop(batch: Batch, local: torch.Tensor | None, masks: torch.Tensor | None) -> Batch:
    """`batch` with the DINO family's fields: local (B, L, 3, h, w), masks (B, 2, N) bool (either None)."""
    b = len(batch)
    if local is not None and (local.dim() != 5 or local.shape[0] != b or local.shape[2] != 3):
        raise ValueError(f"local crops of shape {tuple(local.shape)}: expected (B={b}, L, 3, h, w)")
    if masks is not None and (masks.dim() != 3 or masks.shape[:2] != (b, 2) or masks.dtype != torch.bool):
        raise ValueError(f"masks of shape {tuple(masks.shape)} ({masks.dtype}): expected bool (B={b}, 2, N)")
    return dataclasses.replace(batch, local=local, masks=masks)


def collate_multicrop(batch: Batch, samples: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Batch:
    """`with_multicrop` from per-sample (local (L, 3, h, w), masks (2, N) or None) pairs, in batch order."""
    local = torch.stack([s[0] for s in samples])
    masks = None if samples[0][1] is None else torch.stack([s[1] for s in samples])
    return with_multicrop(batch, local, masks)


def multicrop_sample(
    image: torch.Tensor, key: str, data: DataConfig, mc: MultiCropConfig, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decoded sample -> (view1, view2, targets, θ, local (L, 3, h, w), masks (2, N) or None), the
    reference loader's render with multi-crop. `data` is the global crops' config."""
    crops = sample_multicrop(key, tuple(image.shape[-2:]), data, mc, epoch)
    view1, view2, targets = make_views(image, crops.theta, data)
    return view1, view2, targets, crops.theta, render_local_crops(image, crops.local, mc, data), crops.masks


__all__ = [
    "GREY",
    "LOCAL_DIM",
    "LOCAL_FIELDS",
    "MULTICROP",
    "MultiCropConfig",
    "MultiCropParams",
    "collate_multicrop",
    "global_data_config",
    "local_crop_config",
    "multicrop_sample",
    "photometric_configs",
    "render_local_crops",
    "sample_local_params",
    "sample_masks",
    "sample_multicrop",
    "validate",
    "with_multicrop",
]
