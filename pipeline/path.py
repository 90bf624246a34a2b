"""Augmentation-path semantics: which transformations are active, their ranges, θ sampling and layout.

This module is the single definition that the PyTorch reference pipeline, the DALI pipeline and the
probes all follow (docs/DESIGN.md, "Contracts"). It owns the tables (`G_FIELDS`: each g field's family
and range; `theta_scale`; `FAMILY_FIELDS`) and the formulas (the random-resized-crop rule, the box
clamp, the blur gate, the affine matrix), written so the DALI graph evaluates the same code on its
graph nodes.

A sample is built as
    view1 = A1(I)                     A = random resized crop (+ horizontal flip), resized to img_size
    u     = A2(I)
    view2 = g_θ(u)                    g = colour -> blur -> affine (rotation about the centre, translation)
    u_k   = g_{θ_k}(u),  θ_k = k/(K+1) · θ,  k = 1..K      (the end point θ itself is not a target)

θ layout (one float32 vector per sample, `THETA_FIELDS`):

    idx  name         identity  meaning
    0    rot_deg      0         rotation about the image centre, degrees, counter-clockwise as displayed
    1    tx_px        0         translation right, pixels at `ref_size` resolution (scaled to the output size)
    2    ty_px        0         translation down, pixels at `ref_size` resolution
    3    brightness   0         δb: pixels multiplied by (1 + δb)
    4    contrast     0         δc: blend with the grey mean, factor (1 + δc)       (torchvision semantics)
    5    saturation   0         δs: blend with the greyscale image, factor (1 + δs) (torchvision semantics)
    6    hue          0         δh: hue shift as a fraction of the colour wheel, in [-0.5, 0.5]
    7    blur_sigma   0         Gaussian blur σ in pixels at `ref_size`; σ < 0.1 is identity
    8-11 crop1        -         A1 crop box (y0, x0, h, w) as fractions of the source image
    12   flip1        -         1 if view 1 is flipped horizontally (the flip is applied after the crop)
    13-16 crop2       -         A2 crop box (y0, x0, h, w)
    17   flip2        -         1 if u is flipped

Only the first `G_DIM` entries (the g part) are interpolated: θ_t = t·θ is exactly "colour factors
1 + t·δ, hue shift t·δh, blur σ_t = t·σ, rotation t·φ, translation t·(tx, ty)".

g in detail (`pipeline.oracle.apply_g` is the executable definition, images in [0, 1]):
  colour  brightness, contrast, saturation, hue in that fixed order, torchvision.transforms.v2
          .functional semantics, each skipped at its identity value;
  blur    σ_px = σ·size/ref_size per axis, kernel 2·ceil(3σ_px)+1, reflect padding; identity when the
          θ value σ < BLUR_MIN_SIGMA (decided on θ, not on σ_px, so it does not depend on resolution);
  affine  `affine_matrix` (pixel centres at +0.5, rotation about (W/2, H/2)), bilinear, `fill` outside
          the source, blended at the border like the image.
Crop boxes need the source size, so they are drawn after decoding: by the reference loader from a
generator seeded by (seed, epoch, sample key), by the DALI graph in-graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError

# The g part of θ, in layout order: field -> (family, its sampling range [lo, hi] from the config).
# Adding a family means a row here, a PathConfig range, and its operator in the DALI graph
# (`pipeline.dali_ops.apply_g`) and the reference renderer (`pipeline.oracle.apply_g`).
G_FIELDS: dict[str, tuple[str, Callable[[PathConfig], tuple[float, float]]]] = {
    "rot_deg": ("rotation", lambda c: (-c.rot_deg, c.rot_deg)),
    "tx_px": ("translation", lambda c: (-c.translate_px, c.translate_px)),
    "ty_px": ("translation", lambda c: (-c.translate_px, c.translate_px)),
    "brightness": ("color", lambda c: (-c.brightness, c.brightness)),
    "contrast": ("color", lambda c: (-c.contrast, c.contrast)),
    "saturation": ("color", lambda c: (-c.saturation, c.saturation)),
    "hue": ("color", lambda c: (-c.hue, c.hue)),
    "blur_sigma": ("blur", lambda c: (c.blur_sigma[0], c.blur_sigma[1])),
}
THETA_FIELDS = (
    *G_FIELDS,
    "crop1_y0",
    "crop1_x0",
    "crop1_h",
    "crop1_w",
    "flip1",
    "crop2_y0",
    "crop2_x0",
    "crop2_h",
    "crop2_w",
    "flip2",
)
THETA_DIM = len(THETA_FIELDS)  # P = 18
G_DIM = len(G_FIELDS)  # the interpolated part: rotation, translation, colour, blur
IDX = {name: i for i, name in enumerate(THETA_FIELDS)}
CROP1 = slice(IDX["crop1_y0"], IDX["crop1_w"] + 1)
CROP2 = slice(IDX["crop2_y0"], IDX["crop2_w"] + 1)

# Transformation families a config may activate (the g families, in layout order); "se2" is
# shorthand for rotation + translation.
FAMILIES = tuple(dict.fromkeys(family for family, _ in G_FIELDS.values()))
ALIASES = {"se2": ("rotation", "translation"), "all": FAMILIES}
# θ entries each family controls (used by probes to regress one family at a time).
FAMILY_FIELDS = {
    **{fam: tuple(name for name, (f, _) in G_FIELDS.items() if f == fam) for fam in FAMILIES},
    "crop": ("crop2_y0", "crop2_x0", "crop2_h", "crop2_w"),
    "flip": ("flip2",),
}
MASKS = ("none", "disc")  # PathConfig.mask
CROP_TRIES = 10  # torchvision's RandomResizedCrop draws this many (scale, ratio) pairs before its fallback
BLUR_MIN_SIGMA = 0.1  # σ below this is identity (no blur)


@dataclass
class PathConfig:
    """The augmentation path: active g families, their ranges (defaults: the path paper's Table 2), K."""

    # the active families of g_θ (rotation, translation, color, blur; each alone or together)
    transforms: tuple[str, ...] = ("rotation", "translation", "color", "blur")
    rot_deg: float = 45.0  # rotation uniform in ±rot_deg
    translate_px: float = 10.0  # tx, ty uniform in ±translate_px (pixels at ref_size)
    brightness: float = 0.4  # δ uniform in ±brightness
    contrast: float = 0.4  # contrast factor 1 + δ, δ uniform in ±contrast
    saturation: float = 0.4  # saturation factor 1 + δ, δ uniform in ±saturation
    hue: float = 0.1  # hue shift δh uniform in ±hue (a fraction of the colour circle)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # σ uniform in this range (pixels at ref_size)
    ref_size: int = 224  # resolution at which translate_px and blur_sigma are expressed
    k: int = 2  # number of intermediate targets
    fill: float = 0.0  # value (in [0, 1] pixel space, before normalisation) outside the warped image
    # none | disc: also every pixel outside the central disc set to `fill`, in view 1, view 2 and every
    # target, so that the corners (where a rotation's fill shows) tell nothing about θ (`disc_mask`)
    mask: str = "none"
    crop_scale: tuple[float, float] = (0.2, 1.0)  # A1/A2 random-resized-crop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # A1/A2 aspect ratio range (w/h, in pixels)
    flip_p: float = 0.5  # A1/A2 horizontal flip probability


def active_families(cfg: PathConfig) -> tuple[str, ...]:
    """Expand aliases and validate names; returns the active families in canonical order."""
    names: set[str] = set()
    for name in cfg.transforms:
        if name in ALIASES:
            names.update(ALIASES[name])
        elif name in FAMILIES:
            names.add(name)
        else:
            allowed = ", ".join(FAMILIES + tuple(ALIASES))
            raise ConfigError(f"unknown transformation {name!r} in path.transforms; choose from {allowed}")
    return tuple(f for f in FAMILIES if f in names)


def disc_mask(size: int) -> torch.Tensor:
    """(size, size) bool: pixel centres inside the disc of radius size/2 about the image centre. A
    rotation about the centre maps the disc onto itself, so with everything outside it filled
    (PathConfig.mask = disc) only the content inside can tell the angle."""
    c = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= (size / 2) ** 2


def validate(cfg: PathConfig) -> None:
    """Raise a one-line ValueError for an inconsistent path config."""
    active_families(cfg)
    if cfg.mask not in MASKS:
        raise ConfigError(f"path.mask {cfg.mask!r}: choose from {', '.join(MASKS)}")
    if not 0 <= cfg.fill <= 1:
        raise ConfigError(f"path.fill must be in [0, 1] (pixel space, before normalisation), got {cfg.fill}")
    if cfg.k < 0:
        raise ConfigError(f"path.k must be >= 0, got {cfg.k}")
    lo, hi = cfg.blur_sigma
    if not 0 <= lo <= hi:
        raise ConfigError(f"path.blur_sigma must be (lo, hi) with 0 <= lo <= hi, got {cfg.blur_sigma}")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ConfigError(f"path.crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    if not 0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1]:
        raise ConfigError(f"path.crop_ratio must satisfy 0 < lo <= hi, got {cfg.crop_ratio}")
    if not 0 <= cfg.hue <= 0.5:
        raise ConfigError(f"path.hue must be in [0, 0.5], got {cfg.hue}")
    for name in ("rot_deg", "translate_px", "brightness", "contrast", "saturation"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"path.{name} is a half-range and must be >= 0, got {getattr(cfg, name)}")
    if max(cfg.brightness, cfg.contrast, cfg.saturation) >= 1:
        raise ConfigError("path.brightness/contrast/saturation must be < 1 (factor 1 + δ must stay positive)")


def g_ranges(cfg: PathConfig) -> tuple[list[float], list[float]]:
    """Sampling ranges of the g fields (G,) each: inactive families at [0, 0], i.e. identity."""
    fam = active_families(cfg)
    lo, hi = [], []
    for family, bounds in G_FIELDS.values():
        a, b = bounds(cfg) if family in fam else (0.0, 0.0)
        lo.append(float(a))
        hi.append(float(b))
    return lo, hi


def theta_scale(cfg: PathConfig) -> torch.Tensor:
    """How far each g field reaches, (G,) float32: max |lo|, |hi| of its configured range whether or not
    its family is active, 1 where that is 0, so that θ_g / scale is of order 1 (the SIE hypernetwork)."""
    scale = torch.tensor(
        [max(abs(a), abs(b)) for _, bounds in G_FIELDS.values() for a, b in [bounds(cfg)]],
        dtype=torch.float32,
    )
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def sample_crop(cfg: PathConfig, src_hw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes (y0, x0, h, w) as fractions of each source image.

    src_hw: (n, 2) source heights and widths in pixels. Follows torchvision's RandomResizedCrop: up to
    10 tries of (area fraction, log-uniform aspect ratio); a centre crop clamped to the ratio range if
    none fits. Returns (n, 4) float64.
    """
    n = src_hw.shape[0]
    out = torch.empty(n, 4, dtype=torch.float64)
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    for i in range(n):
        H, W = float(src_hw[i, 0]), float(src_hw[i, 1])
        area = H * W
        box = None
        for _ in range(CROP_TRIES):
            s = float(_uniform(gen, 1, *cfg.crop_scale))
            r = math.exp(float(_uniform(gen, 1, log_lo, log_hi)))
            w = round(math.sqrt(area * s * r))
            h = round(math.sqrt(area * s / r))
            if 0 < w <= W and 0 < h <= H:
                y0 = int(torch.randint(0, int(H - h) + 1, (1,), generator=gen))
                x0 = int(torch.randint(0, int(W - w) + 1, (1,), generator=gen))
                box = (y0, x0, h, w)
                break
        if box is None:  # fallback: central crop at the nearest allowed ratio
            ratio = W / H
            if ratio < cfg.crop_ratio[0]:
                w, h = W, round(W / cfg.crop_ratio[0])
            elif ratio > cfg.crop_ratio[1]:
                h, w = H, round(H * cfg.crop_ratio[1])
            else:
                h, w = H, W
            box = ((H - h) // 2, (W - w) // 2, h, w)
        out[i] = torch.tensor([box[0] / H, box[1] / W, box[2] / H, box[3] / W], dtype=torch.float64)
    return out


def sample_theta(cfg: PathConfig, src_hw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sample θ for n samples: (n, THETA_DIM) float32, inactive families at identity (0).

    src_hw: (n, 2) source image sizes (for the crop boxes). Deterministic given `gen`'s state.
    """
    validate(cfg)
    n = src_hw.shape[0]
    fam = active_families(cfg)
    theta = torch.zeros(n, THETA_DIM, dtype=torch.float64)
    # Draw every field's numbers even when its family is inactive, so switching one family off does
    # not change the others' values for the same seed.
    for i, (family, bounds) in enumerate(G_FIELDS.values()):
        values = _uniform(gen, n, *bounds(cfg))
        if family in fam:
            theta[:, i] = values
    flips = torch.rand(n, 2, generator=gen, dtype=torch.float64) < cfg.flip_p
    theta[:, CROP1] = sample_crop(cfg, src_hw, gen)
    theta[:, IDX["flip1"]] = flips[:, 0].double()
    theta[:, CROP2] = sample_crop(cfg, src_hw, gen)
    theta[:, IDX["flip2"]] = flips[:, 1].double()
    return theta.float()


def interpolate(theta: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """θ_t: the g part scaled by t (0 = identity, 1 = θ), the crop/flip part unchanged. (..., P) -> (..., P)."""
    out = theta.clone()
    out[..., :G_DIM] = theta[..., :G_DIM] * t
    return out


def path_steps(k: int) -> torch.Tensor:
    """The K interpolation points t_k = k/(K+1), k = 1..K: (K,) float32."""
    return torch.arange(1, k + 1, dtype=torch.float32) / (k + 1)


def path_thetas(theta: torch.Tensor, k: int) -> torch.Tensor:
    """θ_k for k = 1..K: (B, P) -> (B, K, P)."""
    t = path_steps(k).to(theta.device)
    return interpolate(theta[:, None, :].expand(-1, k, -1), t[None, :, None])


# The formulas below are written with arithmetic only, plus the few functions passed in (round, min,
# max, ceil, cos, sin, a bool -> float cast), so the same code runs on Python floats, torch tensors and
# DALI graph nodes: the DALI graph calls them with its own operators rather than keeping a copy.


def crop_box_pixels(box, hw, rnd: Callable = round, minimum: Callable = min, maximum: Callable = max):
    """Fractional (y0, x0, h, w) -> integer (top, left, height, width) inside an (H, W) image: rounded,
    then clamped so any box is non-empty and inside the image."""
    H, W = hw
    if rnd is round:  # Python scalars (the reference); a tensor's elements become floats
        box = [float(v) for v in box]
    y0, x0, h, w = box
    top, left = minimum(rnd(y0 * H), H - 1), minimum(rnd(x0 * W), W - 1)
    return top, left, maximum(minimum(rnd(h * H), H - top), 1), maximum(minimum(rnd(w * W), W - left), 1)


def effective_sigma(sigma, out_size: int, ref_size: int, as_float: Callable | None = None):
    """Blur σ in output pixels: σ is defined at ref_size and scaled to out_size; 0 (no blur) where the
    θ value σ itself is below BLUR_MIN_SIGMA. The identity test is on θ, not on the scaled σ, so whether
    a sample is blurred does not depend on the resolution it is rendered at."""
    on = sigma >= BLUR_MIN_SIGMA
    if as_float is not None:
        on = as_float(on)
    else:
        on = on.to(sigma.dtype) if isinstance(sigma, torch.Tensor) else float(on)
    return on * sigma * (out_size / ref_size)


def blur_kernel_size(sigma_px, ceil: Callable = math.ceil):
    """Odd Gaussian kernel length 2·ceil(3σ)+1 for σ in output pixels (1 = identity for σ = 0)."""
    return 2 * ceil(3 * sigma_px) + 1


def affine_entries(
    rot_deg,
    tx,
    ty,
    size_hw: tuple[int, int],
    ref_size: int,
    cos: Callable = math.cos,
    sin: Callable = math.sin,
) -> tuple:
    """The six entries (m00, m01, m02, m10, m11, m12) of `affine_matrix` from g's rotation and translation."""
    H, W = size_hw
    phi = rot_deg * (math.pi / 180.0)
    c, s = cos(phi), sin(phi)
    cx, cy = W / 2.0, H / 2.0
    # Counter-clockwise on screen with y down: forward R = [[cos, sin], [-sin, cos]]; inverse R^T.
    # p = R^T (q - c - t) + c
    qx, qy = -cx - tx * (W / ref_size), -cy - ty * (H / ref_size)
    return c, -s, c * qx - s * qy + cx, s, c, s * qx + c * qy + cy


def affine_matrix(theta_g: torch.Tensor, size_hw: tuple[int, int], ref_size: int) -> torch.Tensor:
    """Inverse affine map of g (output pixel -> input pixel) in pixel coordinates: (..., G) -> (..., 2, 3).

    Coordinates are continuous with pixel (i, j)'s centre at (x=j+0.5, y=i+0.5); the rotation centre
    is the image centre (W/2, H/2). g maps an input point p to R(φ)(p - c) + c + t, where R(φ) rotates
    counter-clockwise as displayed (y points down) and t = (tx, ty)·(W/ref_size, H/ref_size). The
    returned matrix M gives p = M @ [x_out, y_out, 1], the form DALI's warp_affine (inverse_map=True)
    and grid_sample consume.
    """
    rot, tx, ty = (theta_g[..., IDX[name]].double() for name in ("rot_deg", "tx_px", "ty_px"))
    m = affine_entries(rot, tx, ty, size_hw, ref_size, torch.cos, torch.sin)
    return torch.stack(m, dim=-1).unflatten(-1, (2, 3)).float()
