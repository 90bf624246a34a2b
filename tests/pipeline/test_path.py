"""Augmentation-path semantics: θ sampling, interpolation, and the warp/colour/blur steps of g."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from pipeline.batch import DataConfig
from pipeline.demo import PHOTOS
from pipeline.errors import ConfigError
from pipeline.oracle import apply_g, crop_resize, make_views, normalize, warp_affine
from pipeline.path import (
    CROP1,
    CROP2,
    FAMILIES,
    FAMILY_FIELDS,
    G_DIM,
    G_FIELDS,
    IDX,
    THETA_DIM,
    THETA_FIELDS,
    PathConfig,
    active_families,
    affine_matrix,
    blur_kernel_size,
    crop_box_pixels,
    disc_mask,
    effective_sigma,
    g_ranges,
    interpolate,
    path_steps,
    path_thetas,
    sample_theta,
    theta_scale,
)

SRC_HW = torch.tensor([[375.0, 500.0]])


def _theta(n: int, cfg: PathConfig | None = None, seed: int = 0, hw=SRC_HW) -> torch.Tensor:
    return sample_theta(cfg or PathConfig(), hw.expand(n, 2), torch.Generator().manual_seed(seed))


def _photo(size: int = 96) -> torch.Tensor:
    """A real photo as (3, size, size) float in [0, 1]."""
    with Image.open(PHOTOS / "train" / "cat" / "cat_train_00.jpg") as im:
        x = F.pil_to_tensor(im.convert("RGB"))
    return crop_resize(x, (0.0, 0.0, 1.0, 1.0), False, size)


def _g(**values) -> torch.Tensor:
    """One θ row: identity except the named fields."""
    theta = torch.zeros(THETA_DIM)
    for name, v in values.items():
        theta[IDX[name]] = v
    return theta


# --- sampling -----------------------------------------------------------------------------------------


def test_theta_ranges_cover_table2_defaults():
    cfg = PathConfig()
    th = _theta(4000, cfg).double()
    assert th.shape == (4000, THETA_DIM) and th.dtype == torch.float64
    for name, half in [
        ("rot_deg", 45),
        ("tx_px", 10),
        ("ty_px", 10),
        ("brightness", 0.4),
        ("contrast", 0.4),
        ("saturation", 0.4),
        ("hue", 0.1),
    ]:
        col = th[:, IDX[name]]
        assert col.abs().max() <= half + 1e-6, name
        assert col.min() < -0.95 * half and col.max() > 0.95 * half, f"{name} does not span ±{half}"
    sigma = th[:, IDX["blur_sigma"]]
    assert sigma.min() >= 0.1 - 1e-6 and sigma.max() <= 2.0 + 1e-6 and sigma.max() > 1.9
    for crop in (CROP1, CROP2):
        y0, x0, h, w = th[:, crop].unbind(1)
        assert (
            (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
        )
        area = h * w
        assert area.min() > 0.19 and area.max() <= 1 + 1e-6
        ratio = (w * 500) / (h * 375)  # w/h in pixels
        assert ratio.min() > 0.74 and ratio.max() < 1.34
    flips = th[:, [IDX["flip1"], IDX["flip2"]]]
    assert set(flips.unique().tolist()) == {0.0, 1.0}
    assert 0.45 < flips.mean() < 0.55


def test_inactive_families_stay_at_identity_and_active_values_do_not_move():
    full = _theta(64, PathConfig(), seed=3)
    rot_only = _theta(64, PathConfig(transforms=("rotation",)), seed=3)
    assert torch.equal(rot_only[:, IDX["rot_deg"]], full[:, IDX["rot_deg"]])
    others = [IDX[f] for fam in ("translation", "color", "blur") for f in FAMILY_FIELDS[fam]]
    assert (rot_only[:, others] == 0).all()
    # crops and flips are always drawn, identically
    assert torch.equal(rot_only[:, G_DIM:], full[:, G_DIM:])
    se2 = _theta(64, PathConfig(transforms=("se2",)), seed=3)
    assert (se2[:, IDX["tx_px"]] != 0).all() and (se2[:, IDX["brightness"]] == 0).all()
    assert active_families(PathConfig(transforms=("all",))) == ("rotation", "translation", "color", "blur")


def test_sampling_is_deterministic_by_seed():
    assert torch.equal(_theta(16, seed=7), _theta(16, seed=7))
    assert not torch.equal(_theta(16, seed=7), _theta(16, seed=8))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"transforms": ("rotation", "shear")}, "unknown transformation 'shear'"),
        ({"k": -1}, "path.k"),
        ({"brightness": 1.2}, "brightness"),
        ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"),
        ({"mask": "circle"}, "path.mask 'circle': choose from none, disc"),
        ({"fill": 2.0}, r"path.fill must be in \[0, 1\]"),
    ],
)
def test_bad_path_config_is_a_one_line_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        _theta(1, PathConfig(**bad))


# --- interpolation ------------------------------------------------------------------------------------


def test_interpolation_scales_only_the_g_part():
    th = _theta(5)
    assert (interpolate(th, 0)[:, :G_DIM] == 0).all()
    assert torch.equal(interpolate(th, 1), th)
    assert torch.equal(interpolate(th, 0.25)[:, G_DIM:], th[:, G_DIM:])
    assert torch.allclose(path_steps(2), torch.tensor([1 / 3, 2 / 3]))
    ks = path_thetas(th, 3)  # (B, K, P)
    assert ks.shape == (5, 3, THETA_DIM)
    for k in range(3):
        assert torch.allclose(ks[:, k], interpolate(th, (k + 1) / 4))


def test_t0_is_identity_and_t1_is_view2_exactly():
    cfg = DataConfig(img_size=48, aug=PathConfig(k=2))
    with Image.open(PHOTOS / "train" / "coffee" / "coffee_train_00.jpg") as im:
        img = F.pil_to_tensor(im.convert("RGB"))
    theta = _theta(1, cfg.aug, seed=11, hw=torch.tensor([img.shape[-2:]], dtype=torch.float64))[0]
    _view1, view2, targets = make_views(img, theta, cfg)
    u = crop_resize(img, theta[CROP2], theta[IDX["flip2"]] > 0.5, 48)
    assert torch.equal(apply_g(u, interpolate(theta, 0.0), cfg.aug), u)
    assert torch.equal(normalize(apply_g(u, interpolate(theta, 1.0), cfg.aug), cfg), view2)
    for k in range(2):
        expect = normalize(apply_g(u, interpolate(theta, (k + 1) / 3), cfg.aug), cfg)
        assert torch.equal(targets[k], expect)
    # the path really moves: u -> target 1 -> target 2 -> view 2 get further from u
    dist = [(normalize(u, cfg) - x).abs().mean().item() for x in (targets[0], targets[1], view2)]
    assert 0 < dist[0] < dist[1] < dist[2], dist


# --- the steps of g -----------------------------------------------------------------------------------


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the mass centre of a (H, W) image in continuous pixel coords (centres at +0.5)."""
    H, W = img.shape
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    m = img.double()
    return float((m.sum(0) * xs).sum() / m.sum()), float((m.sum(1) * ys).sum() / m.sum())


@pytest.mark.parametrize(
    "rot, tx, ty", [(30.0, 0.0, 0.0), (-45.0, 7.0, -4.0), (0.0, -9.0, 6.0), (90.0, 3.0, 2.0)]
)
def test_affine_matrix_says_where_a_mark_moves(rot, tx, ty):
    H, W, ref = 64, 80, 224
    img = torch.zeros(1, 3, H, W)
    img[:, :, 20:23, 50:53] = 1.0  # a 3×3 mark centred at (x, y) = (51.5, 21.5)
    theta = _g(rot_deg=rot, tx_px=tx, ty_px=ty)
    out = warp_affine(img, theta[None], ref, fill=0.0)[0, 0]
    m = affine_matrix(theta, (H, W), ref).double()  # output -> input
    fwd = torch.linalg.inv(torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))
    want = fwd @ torch.tensor([51.5, 21.5, 1.0], dtype=torch.float64)
    got = _centroid(out)
    assert abs(got[0] - want[0]) < 0.2 and abs(got[1] - want[1]) < 0.2, (got, want[:2])


def test_positive_rotation_is_counter_clockwise_on_screen():
    img = torch.zeros(1, 1, 33, 33)
    img[..., 15:18, 27:30] = 1.0  # right of the centre
    out = warp_affine(img, _g(rot_deg=90.0)[None], 224, 0.0)[0, 0]
    x, y = _centroid(out)
    assert abs(x - 16.5) < 0.3 and abs(y - 4.5) < 0.3  # 12 px right of the centre -> 12 px above


def test_translation_is_in_ref_size_pixels_and_fill_is_used():
    img = torch.rand(1, 3, 112, 112)
    out = warp_affine(img, _g(tx_px=8.0)[None], 224, fill=0.25)  # 8 px at 224 = 4 px at 112
    assert torch.allclose(out[..., 4:], img[..., :-4], atol=1e-5)
    assert torch.allclose(out[..., :4], torch.full_like(out[..., :4], 0.25))


def test_blur_sigma_scales_with_size_and_small_sigma_is_identity():
    cfg = PathConfig(ref_size=224)
    x = _photo(112)
    out = apply_g(x, _g(blur_sigma=1.6), cfg)
    s = effective_sigma(1.6, 112, 224)
    assert s == pytest.approx(0.8) and blur_kernel_size(s) == 7  # 2·ceil(2.4)+1
    assert torch.allclose(out, F.gaussian_blur(x, [7, 7], [0.8, 0.8]), atol=1e-6)
    assert torch.equal(apply_g(x, _g(blur_sigma=0.09), cfg), x)
    assert not torch.equal(apply_g(x, _g(blur_sigma=0.5), cfg), x)


def test_colour_follows_torchvision_in_fixed_order():
    cfg = PathConfig()
    x = _photo(40)
    th = _g(brightness=0.3, contrast=-0.2, saturation=0.35, hue=-0.07)
    want = F.adjust_hue(F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, 1.3), 0.8), 1.35), -0.07)
    assert torch.allclose(apply_g(x, th, cfg), want, atol=1e-6)


def test_batched_g_equals_one_image_at_a_time():
    cfg = PathConfig()
    x = _photo(40).expand(4, -1, -1, -1).contiguous()
    th = _theta(4, cfg, seed=5)
    batched = apply_g(x, th, cfg)
    assert batched.shape == x.shape and batched.min() >= 0 and batched.max() <= 1
    for i in range(4):
        assert torch.allclose(batched[i], apply_g(x[i], th[i], cfg), atol=1e-6)
    with pytest.raises(ValueError, match="θ rows"):
        apply_g(x, th[:3], cfg)


def _disc(size: int, margin: float) -> torch.Tensor:
    c = torch.arange(size) + 0.5 - size / 2
    return (c[None, :] ** 2 + c[:, None] ** 2).sqrt() < size / 2 - margin


def test_path_consistency_rotating_target_k_by_the_rest_gives_view2():
    cfg = PathConfig(transforms=("rotation",), k=2)
    u = _photo(96)
    phi = 36.0
    theta = _g(rot_deg=phi)
    view2 = apply_g(u, theta, cfg)
    inside = _disc(96, margin=3)
    for k, t in enumerate(path_steps(cfg.k).tolist(), start=1):
        target = apply_g(u, interpolate(theta, t), cfg)
        err = (apply_g(target, _g(rot_deg=(1 - t) * phi), cfg) - view2).abs()[:, inside].mean().item()
        wrong = (apply_g(target, _g(rot_deg=(1 - t) * phi + 4), cfg) - view2).abs()[:, inside].mean().item()
        # the remaining rotation lands on view 2 up to double bilinear resampling; 4° off does not
        assert err < 0.02 and wrong > 3 * err, (k, err, wrong)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_g_on_cuda_matches_cpu():
    cfg = PathConfig()
    x = _photo(64).expand(3, -1, -1, -1).contiguous()
    th = _theta(3, cfg, seed=2)
    assert torch.allclose(apply_g(x.cuda(), th.cuda(), cfg).cpu(), apply_g(x, th, cfg), atol=2e-3)
    assert math.isfinite(float(apply_g(x.cuda(), th, cfg).sum()))


def test_g_ranges_and_theta_scale_come_from_one_table():
    cfg = PathConfig(rot_deg=30.0, translate_px=0.0, blur_sigma=(0.5, 3.0), hue=0.05)
    # the SIE hypernetwork's input scale: each field's half-range, 1 where it is 0 (translation here)
    assert theta_scale(cfg).tolist() == pytest.approx([30, 1, 1, 0.4, 0.4, 0.4, 0.05, 3.0])
    lo, hi = g_ranges(PathConfig(transforms=("blur", "rotation")))
    assert lo == [-45.0] + [0.0] * 6 + [0.1] and hi == [45.0] + [0.0] * 6 + [2.0]  # inactive: identity
    assert list(G_FIELDS) == list(THETA_FIELDS[:G_DIM])
    assert FAMILY_FIELDS["translation"] == ("tx_px", "ty_px") and FAMILIES == (
        "rotation",
        "translation",
        "color",
        "blur",
    )


def test_crop_box_pixels_clamps_any_box_inside_the_image():
    assert crop_box_pixels([0.25, 0.5, 0.5, 0.25], (100, 80)) == (25, 40, 50, 20)
    assert crop_box_pixels([0.999, 1.2, 0.9, 0.0], (10, 10)) == (9, 9, 1, 1)  # past the edge: 1 px inside


# --- training without the corner shortcut (PathConfig.mask = disc) -------------------------------------


def _sample_views(mask: str, seed: int = 5):
    cfg = DataConfig(
        img_size=40, target_size=24, aug=PathConfig(transforms=("rotation",), mask=mask, fill=0.5)
    )
    with Image.open(PHOTOS / "train" / "cat" / "cat_train_00.jpg") as im:
        img = F.pil_to_tensor(im.convert("RGB"))
    theta = sample_theta(
        cfg.aug, torch.tensor([img.shape[-2:]], dtype=torch.float64), torch.Generator().manual_seed(seed)
    )[0]
    theta[IDX["rot_deg"]] = 40.0  # far enough that the black-free corners would show the fill
    return cfg, [
        x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
        for x in make_views(img, theta, cfg)
    ]


def test_disc_mask_fills_outside_the_disc_in_both_views_and_every_target():
    _, plain = _sample_views("none")
    _, masked = _sample_views("disc")
    for name, a, b in zip(("view1", "view2", "targets"), plain, masked):
        inside = disc_mask(a.shape[-1])
        assert inside.float().mean() == pytest.approx(math.pi / 4, abs=0.03), name
        assert torch.allclose(b[..., ~inside], torch.full_like(b[..., ~inside], 0.5), atol=1e-6), name
        torch.testing.assert_close(b[..., inside], a[..., inside], atol=1e-6, rtol=0, msg=name)
    # the corners of the unmasked view 2 are the rotation's fill; the masked one has none left to read
    corner = ~disc_mask(40)
    assert not torch.allclose(plain[1][..., corner], masked[1][..., corner])


def test_disc_mask_is_the_same_in_dali_and_the_reference():
    """DALI <-> reference parity with mask=disc (rotation, random crops and flips): the disc and fill
    agree exactly outside, the images within the view parity tolerance of tests/pipeline/test_dali.py."""
    from pipeline import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    from pipeline.dali import render_batch
    from pipeline.oracle import decode

    cfg = DataConfig(
        img_size=48,
        target_size=32,
        aug=PathConfig(transforms=("rotation", "translation"), mask="disc", fill=0.5),
    )
    files = sorted(PHOTOS.glob("train/*/*_00.jpg"))[:6]
    images = [decode(f.read_bytes(), f.name) for f in files]
    sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.float64)
    theta = sample_theta(cfg.aug, sizes, torch.Generator().manual_seed(11))
    dali = render_batch(images, theta, cfg, "cpu", None)
    refs = [make_views(im, th, cfg) for im, th in zip(images, theta)]
    ref = [torch.stack([r[i] for r in refs]) for i in range(3)]
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for name, a, b in zip(("view1", "view2", "targets"), dali, ref):
        a, b = a * std + mean, b * std + mean  # [0, 1] pixels
        assert a.shape == b.shape, name
        inside = disc_mask(a.shape[-1])
        outside_a, outside_b = a[..., ~inside], b[..., ~inside]
        assert torch.allclose(outside_a, torch.full_like(outside_a, 0.5), atol=1e-5), name
        assert torch.allclose(outside_b, torch.full_like(outside_b, 0.5), atol=1e-5), name
        diff = (a - b).abs()[..., inside]
        assert float(diff.mean()) <= 2e-3 and float(diff.max()) <= 0.1, (
            name,
            float(diff.mean()),
            float(diff.max()),
        )
