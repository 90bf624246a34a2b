"""The DALI graph's operators: θ sampling, crops, and g_θ (colour -> blur -> affine) on DALI nodes,
the same semantics as `pipeline.path` and the reference renderer (`pipeline.reference`), which the
parity tests compare them against. `pipeline/dali.py` builds the pipeline and the loader from them;
`pipeline/dali_multicrop.py` adds the DINO family's local crops with the same operators.

DALI's own colour operators differ from torchvision (`fn.hsv`/`fn.saturation` work in YIQ, and
`fn.contrast` pivots on a fixed grey instead of the image mean), so colour is written with arithmetic
operators: brightness and saturation as per-pixel linear maps, contrast around the mean grey, hue by the
exact HSV rotation (the closed form f(n) = V - C·clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.batch import DataConfig
from pipeline.path import (
    CROP1,
    CROP2,
    CROP_TRIES,
    G_DIM,
    G_FIELDS,
    IDX,
    PathConfig,
    active_families,
    affine_entries,
    blur_kernel_size,
    crop_box_pixels,
    disc_mask,
    effective_sigma,
    g_ranges,
    path_steps,
)

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ------------------------------------------------------------------------------------- graph pieces
# Scalars (θ and everything derived from it) live on the CPU: DALI argument inputs must. Image tensors
# are HWC float32 in [0, 1] and live on `dev`; `_on(x, dev)` moves a CPU scalar next to them.


def _fn():
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    return fn, dmath, types


def _on(node, dev: str):
    return node.gpu() if dev == "gpu" else node


def _const(values) -> object:
    _, _, types = _fn()
    return types.Constant(np.asarray(values, dtype=np.float32), device="cpu")


def _as_float(mask):
    fn, _, types = _fn()
    return fn.cast(mask, dtype=types.FLOAT)


def _round(x):
    _, dmath, _ = _fn()
    return dmath.floor(x + 0.5)


def sample_crop(H, W, cfg: PathConfig):
    """torchvision's RandomResizedCrop box for source size (H, W) -> (y0, x0, h, w) scalars in pixels.

    The 10 tries are drawn at once and the first that fits wins; without one, a centre crop clamped to
    the ratio range, as torchvision does.
    """
    fn, dmath, _ = _fn()
    area = H * W
    u = fn.random.uniform(range=[0.0, 1.0], shape=[2, CROP_TRIES])
    lo, hi = cfg.crop_scale
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    scale = u[0] * (hi - lo) + lo
    ratio = dmath.exp(u[1] * (log_hi - log_lo) + log_lo)
    w_try = _round(dmath.sqrt(area * scale * ratio))
    h_try = _round(dmath.sqrt(area * scale / ratio))
    fits = _as_float((w_try <= W) & (h_try <= H) & (w_try > 0) & (h_try > 0))
    priority = fits * _const(np.arange(CROP_TRIES, 0, -1))  # (10,): the first fitting try ranks highest
    best = fn.reductions.max(priority)
    pick = _as_float(priority == best) * fits  # one-hot at the first fitting try, all zero if none fits
    found = _as_float(best > 0)
    w_fit, h_fit = fn.reductions.sum(pick * w_try), fn.reductions.sum(pick * h_try)
    # centre-crop fallback at the nearest allowed aspect ratio
    narrow = _as_float(W / H < cfg.crop_ratio[0])
    wide = _as_float(W / H > cfg.crop_ratio[1])
    w_fb = wide * _round(H * cfg.crop_ratio[1]) + (1.0 - wide) * W
    h_fb = narrow * _round(W / cfg.crop_ratio[0]) + (1.0 - narrow) * H
    w = found * w_fit + (1.0 - found) * w_fb
    h = found * h_fit + (1.0 - found) * h_fb
    v = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    y0 = found * dmath.min(dmath.floor(v[0] * (H - h + 1.0)), H - h) + (1.0 - found) * dmath.floor(
        (H - h) / 2.0
    )
    x0 = found * dmath.min(dmath.floor(v[1] * (W - w + 1.0)), W - w) + (1.0 - found) * dmath.floor(
        (W - w) / 2.0
    )
    return y0, x0, h, w


def sample_theta(H, W, cfg: PathConfig):
    """θ per sample (THETA_DIM,) float32 in the `path.THETA_FIELDS` layout; inactive families at 0."""
    fn, _, types = _fn()
    lo, hi = (np.asarray(v) for v in g_ranges(cfg))  # (G,) each, inactive families at [0, 0]
    g = fn.random.uniform(range=[0.0, 1.0], shape=[G_DIM]) * _const(hi - lo) + _const(lo)
    flips = fn.cast(fn.random.coin_flip(probability=cfg.flip_p, shape=[2]), dtype=types.FLOAT)
    parts = [g]
    for i in range(2):
        y0, x0, h, w = sample_crop(H, W, cfg)
        parts += [fn.stack(y0 / H, x0 / W, h / H, w / W), flips[i : i + 1]]
    return fn.cat(*parts, axis=0)


def crop_resize(img, theta, H, W, which: int, size: int, dev: str):
    """Crop box `which` (1 or 2) of θ, resize to size×size, flip if its flip is set -> HWC [0, 1].

    The box is stored as fractions; rounding them back to pixels recovers the integer box exactly.
    The crop is cut out before resizing (not a resize ROI) because a ROI lets the filter read pixels
    outside the box at its edges, which torchvision's resized_crop never sees.
    """
    fn, dmath, types = _fn()
    box, flip = (CROP1, IDX["flip1"]) if which == 1 else (CROP2, IDX["flip2"])
    # path's clamp, run on graph nodes: any θ gives a non-empty box inside the image
    y0, x0, h, w = crop_box_pixels(
        [theta[box.start + i] for i in range(4)], (H, W), _round, dmath.min, dmath.max
    )
    crop = fn.slice(
        img,
        start=fn.cast(fn.stack(y0, x0), dtype=types.INT32),
        shape=fn.cast(fn.stack(h, w), dtype=types.INT32),
        axes=[0, 1],
    )
    out = fn.resize(
        crop, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT
    )
    out = fn.flip(out, horizontal=fn.cast(theta[flip] > 0.5, dtype=types.INT32))
    return out * (1.0 / 255.0)


def _clamp01(x):
    _, dmath, _ = _fn()
    return dmath.clamp(x, 0.0, 1.0)


def _linear(x, m):
    """Per-pixel colour map x -> m·x, m a per-sample (3, 3) matrix on the CPU."""
    fn, _, _ = _fn()
    return fn.coord_transform(x, M=m)


def adjust_color(x, b, c, s, h, dev: str):
    """torchvision's adjust_brightness -> adjust_contrast -> adjust_saturation -> adjust_hue on HWC [0, 1].

    b, c, s are the factors 1 + t·δ and h the hue shift t·δh (CPU scalars).
    """
    fn, _, _ = _fn()
    eye, grey_rows = np.eye(3), np.tile(np.asarray(GREY), (3, 1))
    x = _clamp01(x * _on(b, dev))
    # contrast blends with the mean grey level: mean(grey) = Σ_c w_c · mean(x_c)
    mean_grey = fn.reductions.sum(fn.reductions.mean(x, axes=[0, 1]) * _on(_const(GREY), dev))
    c_dev = _on(c, dev)
    x = _clamp01(x * c_dev + (1.0 - c_dev) * mean_grey)
    # saturation blends with the grey image: one per-pixel linear map s·I + (1 - s)·W
    x = _clamp01(_linear(x, s * _const(eye) + (1.0 - s) * _const(grey_rows)))
    return shift_hue(x, h, dev)


def shift_hue(x, h, dev: str):
    """torchvision's adjust_hue (RGB -> HSV, h += shift mod 1, HSV -> RGB), exact, on HWC [0, 1]."""
    fn, dmath, _ = _fn()
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    maxc = dmath.max(dmath.max(r, g), b)
    minc = dmath.min(dmath.min(r, g), b)
    chroma = maxc - minc
    flat = _as_float(chroma == 0.0)
    div = chroma + flat  # 1 where the pixel is grey, as torchvision does
    is_r = _as_float(maxc == r)
    is_g = (1.0 - is_r) * _as_float(maxc == g)
    is_b = (1.0 - is_r) * (1.0 - is_g)
    hue6 = is_r * ((g - b) / div) + is_g * (2.0 + (b - r) / div) + is_b * (4.0 + (r - g) / div)
    hue6 = hue6 + _on(h, dev) * 6.0  # hue in sixths of the wheel; the mod below wraps it
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = hue6 + n
        k = k - 6.0 * dmath.floor(k / 6.0)
        channels.append(maxc - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    # stacking drops the layout; without "HWC" the blur would also smooth across the channel axis
    return fn.reshape(fn.stack(*channels, axis=2), layout="HWC")


def blur(x, sigma_t, size: int, cfg: PathConfig):
    """Gaussian blur with σ_t (θ units, defined at ref_size) scaled to `size`; σ_t < 0.1 is identity."""
    fn, dmath, types = _fn()
    sigma = effective_sigma(sigma_t, size, cfg.ref_size, _as_float)
    window = fn.cast(blur_kernel_size(sigma, dmath.ceil), dtype=types.INT32)  # 1 = identity
    return fn.gaussian_blur(x, sigma=sigma, window_size=window)


def warp(x, rot_deg, tx, ty, size: int, cfg: PathConfig):
    """Rotation about the centre and translation: `path.affine_matrix` built from per-sample scalars."""
    fn, dmath, types = _fn()
    m = fn.stack(*affine_entries(rot_deg, tx, ty, (size, size), cfg.ref_size, dmath.cos, dmath.sin))
    return fn.warp_affine(
        x,
        matrix=fn.reshape(m, shape=[2, 3]),
        size=[size, size],
        inverse_map=True,
        fill_value=cfg.fill,
        interp_type=types.INTERP_LINEAR,
    )


def apply_g(u, theta, t: float, size: int, cfg: PathConfig, dev: str):
    """g_{t·θ}(u): colour -> blur -> affine, each family only when active. u: HWC [0, 1] at size×size."""
    fam = active_families(cfg)
    g = {name: theta[IDX[name]] * t for name in G_FIELDS}
    x = u
    if "color" in fam:
        x = adjust_color(x, 1.0 + g["brightness"], 1.0 + g["contrast"], 1.0 + g["saturation"], g["hue"], dev)
    if "blur" in fam:
        x = blur(x, g["blur_sigma"], size, cfg)
    if "rotation" in fam or "translation" in fam:
        x = warp(x, g["rot_deg"], g["tx_px"], g["ty_px"], size, cfg)
    return x


def mask_disc(x, size: int, fill: float, dev: str):
    """PathConfig.mask = disc: pixels outside the central disc (`path.disc_mask`) set to fill.
    x: HWC [0, 1] at size×size; the mask is a constant (size, size, 3) 0/1 image, so the blend is exact."""
    _, _, types = _fn()
    inside = np.repeat(disc_mask(size).numpy().astype(np.float32)[:, :, None], 3, axis=2)
    return x * types.Constant(inside, device=dev) + types.Constant(fill * (1.0 - inside), device=dev)


def render(img, theta, H, W, cfg: DataConfig, dev: str):
    """Decoded image (HWC uint8 on dev) + θ -> (view1, view2, targets) normalised CHW; targets (K, 3, Ht, Wt)."""
    fn, _, types = _fn()
    aug = cfg.aug
    norm = {"mean": list(cfg.mean), "std": list(cfg.std), "output_layout": "CHW", "dtype": types.FLOAT}
    disc = (lambda x, size: mask_disc(x, size, aug.fill, dev)) if aug.mask == "disc" else (lambda x, size: x)
    view1 = fn.crop_mirror_normalize(
        disc(crop_resize(img, theta, H, W, 1, cfg.img_size, dev), cfg.img_size), **norm
    )
    u = crop_resize(img, theta, H, W, 2, cfg.img_size, dev)
    view2 = fn.crop_mirror_normalize(
        disc(apply_g(u, theta, 1.0, cfg.img_size, aug, dev), cfg.img_size), **norm
    )
    if aug.k == 0:
        return view1, view2, None
    ts = cfg.out_target_size
    u_t = u
    if ts != cfg.img_size:  # u itself resized, as the reference does (not a fresh crop of the source)
        u_t = fn.resize(u, size=[ts, ts], interp_type=types.INTERP_LINEAR, antialias=True)
    targets = [
        fn.crop_mirror_normalize(disc(apply_g(u_t, theta, float(t), ts, aug, dev), ts), **norm)
        for t in path_steps(aug.k).tolist()
    ]
    return view1, view2, fn.stack(*targets, axis=0)
