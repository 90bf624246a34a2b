"""The pixel oracle: one sample's pixels with pipeline.path's semantics in plain PyTorch (CPU or CUDA
tensors), the twin of pipeline/dali_ops.py and what every other renderer is tested against.

    img = decode(jpg)                                   # (3, H, W) uint8
    theta = sample_theta_for(key, img.shape[-2:], cfg, epoch)
    view1, view2, targets = make_views(img, theta, cfg) # normalised; targets (K, 3, T, T)

The reference loader (pipeline/reference.py), multi-crop (pipeline/multicrop.py) and the probes'
pairs (pipeline/pairs.py) render with these functions; θ for a sample depends only on (seed, epoch, key).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from PIL import Image

from pipeline.batch import DataConfig
from pipeline.errors import DataError
from pipeline.path import (
    CROP1,
    CROP2,
    G_DIM,
    IDX,
    PathConfig,
    affine_matrix,
    blur_kernel_size,
    crop_box_pixels,
    disc_mask,
    effective_sigma,
    path_thetas,
    sample_theta,
)

# ---------------------------------------------------------------------------------------------------
# Pure functions: one sample's pixels


def decode(jpg: bytes, key: str = "?") -> torch.Tensor:
    """JPEG (or any image PIL reads) bytes -> (3, H, W) uint8 RGB; greyscale and CMYK are converted."""
    if not jpg:
        raise DataError(f"sample {key!r}: empty image bytes")
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            rgb = np.asarray(im.convert("RGB"))  # decodes fully: truncation raises here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"sample {key!r}: undecodable image ({str(e).splitlines()[0]})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def crop_resize(
    img: torch.Tensor, box: Sequence[float] | torch.Tensor, flip: bool | float | torch.Tensor, size: int
) -> torch.Tensor:
    """A1/A2: crop the fractional box (y0, x0, h, w), resize to size×size (bilinear, antialiased), then
    flip horizontally if flip. (3, H, W) uint8 or float in [0, 1] -> (3, size, size) float32 in [0, 1]."""
    top, left, h, w = crop_box_pixels(box, tuple(img.shape[-2:]))
    x = F.to_dtype(img[:, top : top + h, left : left + w], torch.float32, scale=True)  # crop, then convert
    x = F.resize(x, [size, size], antialias=True)
    if bool(flip):
        x = F.horizontal_flip(x)
    return x.clamp_(0, 1)


def _colour_blur(x: torch.Tensor, theta: torch.Tensor, cfg: PathConfig) -> torch.Tensor:
    """g's colour and blur steps on one image: (3, H, W) float, θ (P,) -> (3, H, W)."""
    b, c, s, h, sigma = theta[IDX["brightness"] : IDX["blur_sigma"] + 1].tolist()
    # Each op is skipped at its identity so θ = 0 returns the input bit for bit.
    if b:
        x = F.adjust_brightness(x, 1 + b)
    if c:
        x = F.adjust_contrast(x, 1 + c)
    if s:
        x = F.adjust_saturation(x, 1 + s)
    if h:
        x = F.adjust_hue(x, h)
    H, W = x.shape[-2:]
    sx, sy = effective_sigma(sigma, W, cfg.ref_size), effective_sigma(sigma, H, cfg.ref_size)
    if sx > 0:
        x = gaussian_blur(x, sx, sy)
    return x


def _gauss1d(sigma: float, device: torch.device) -> torch.Tensor:
    k = blur_kernel_size(sigma)
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def gaussian_blur(x: torch.Tensor, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """torchvision's gaussian_blur (kernel 2·ceil(3σ)+1 per axis, reflect padding) done separably,
    ~5× faster at σ = 2 and equal to it up to float rounding. (C, H, W) float -> (C, H, W)."""
    C = x.shape[0]
    kx, ky = _gauss1d(sigma_x, x.device), _gauss1d(sigma_y, x.device)
    px, py = kx.numel() // 2, ky.numel() // 2
    out = nnf.pad(x[None], [px, px, py, py], mode="reflect")  # (1, C, H + 2py, W + 2px)
    out = nnf.conv2d(out, kx.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    out = nnf.conv2d(out, ky.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return out[0]


def warp_affine(x: torch.Tensor, theta: torch.Tensor, ref_size: int, fill: float) -> torch.Tensor:
    """g's affine step, exactly `path.affine_matrix`: (N, C, H, W), θ (N, P) -> (N, C, H, W).

    Bilinear; outside the source image the result is `fill`, blended at the border like the image.
    """
    C, H, W = x.shape[1:]
    moving = theta[:, IDX["rot_deg"] : IDX["ty_px"] + 1].ne(0).any(dim=1)
    if not moving.any():
        return x
    m = affine_matrix(theta[moving, :G_DIM], (H, W), ref_size).to(x.device)  # (n, 2, 3) out px -> in px
    ys = torch.arange(H, device=x.device, dtype=torch.float32) + 0.5  # pixel centres
    xs = torch.arange(W, device=x.device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # (H, W, 3) homogeneous (x, y, 1)
    src = torch.einsum("hwk,nik->nhwi", pts, m)  # (n, H, W, 2) source (x, y) in pixels
    # align_corners=False: normalised -1/+1 are the outer pixel edges, i.e. pixel coords 0 and W.
    grid = src / torch.tensor([W / 2, H / 2], device=x.device) - 1
    sub = x[moving]
    ones = torch.ones_like(sub[:, :1])
    warped = nnf.grid_sample(
        torch.cat([sub, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    inside = warped[:, C:]  # (n, 1, H, W): how much of each output pixel came from the image
    out = x.clone()
    out[moving] = warped[:, :C] + (1 - inside) * fill
    return out


def apply_g(img: torch.Tensor, theta: torch.Tensor, cfg: PathConfig) -> torch.Tensor:
    """g_θ: colour (brightness, contrast, saturation, hue; torchvision semantics, factors 1 + δ) ->
    Gaussian blur (σ scaled from cfg.ref_size, kernel 2·ceil(3σ)+1, reflect padding) -> affine
    (`warp_affine`). One θ row per image.

    img (3, H, W) with theta (P,), or (N, 3, H, W) with theta (N, P); float in [0, 1], any device.
    Returns the same shape, float in [0, 1].
    """
    single = img.dim() == 3
    x = img[None] if single else img
    th = theta.reshape(-1, theta.shape[-1])
    if th.shape[0] != x.shape[0] or th.shape[1] < G_DIM:
        raise ValueError(
            f"apply_g: {x.shape[0]} images need {x.shape[0]} θ rows of >= {G_DIM} values, "
            f"got θ of shape {tuple(theta.shape)}"
        )
    th = th.to(x.device, torch.float32)
    x = torch.stack([_colour_blur(x[i], th[i], cfg) for i in range(x.shape[0])])
    x = warp_affine(x, th, cfg.ref_size, cfg.fill).clamp_(0, 1)
    return x[0] if single else x


def normalize(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """[0, 1] pixels -> (x - mean) / std, any (..., 3, H, W)."""
    mean = torch.tensor(cfg.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def make_views(
    img: torch.Tensor, theta: torch.Tensor, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample: (3, H, W) uint8, θ (P,) -> view1 (3, S, S), view2 (3, S, S), targets (K, 3, T, T).

    view1 = A1(img); u = A2(img); view2 = g_θ(u); targets u_k = g_{θ_k}(u) with θ_k = k/(K+1)·θ and u
    first resized to T = cfg.out_target_size when it differs from S = cfg.img_size. All normalised.
    """
    S, T, K = cfg.img_size, cfg.out_target_size, cfg.aug.k
    view1 = crop_resize(img, theta[CROP1], theta[IDX["flip1"]] > 0.5, S)
    u = crop_resize(img, theta[CROP2], theta[IDX["flip2"]] > 0.5, S)
    view2 = apply_g(u, theta, cfg.aug)
    if T != S:
        u = F.resize(u, [T, T], antialias=True).clamp_(0, 1)
    if K:
        targets = apply_g(u.expand(K, -1, -1, -1), path_thetas(theta[None], K)[0], cfg.aug)
    else:
        targets = u.new_zeros(0, 3, T, T)
    if cfg.aug.mask == "disc":  # the same disc on every image of the sample (path.disc_mask)
        view1, view2, targets = (mask_disc(x, cfg.aug.fill) for x in (view1, view2, targets))
    return normalize(view1, cfg), normalize(view2, cfg), normalize(targets, cfg)


def mask_disc(x: torch.Tensor, fill: float) -> torch.Tensor:
    """(..., H, W) square images in [0, 1] -> the same with every pixel outside the central disc = fill."""
    return torch.where(disc_mask(x.shape[-1]).to(x.device), x, torch.full_like(x, fill))


# ---------------------------------------------------------------------------------------------------
# Seeds


def seed_of(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """The generator that draws θ for one sample: depends on (seed, epoch, key) only."""
    return torch.Generator().manual_seed(seed_of("theta", seed, epoch, key))


def sample_theta_for(key: str, src_hw: tuple[int, int], cfg: DataConfig, epoch: int) -> torch.Tensor:
    """θ (P,) of sample `key` (source size src_hw) in `epoch`, as the reference loader draws it."""
    gen = sample_generator(cfg.seed, epoch, key)
    return sample_theta(cfg.aug, torch.tensor([src_hw], dtype=torch.float64), gen)[0]
