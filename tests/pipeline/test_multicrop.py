"""Multi-crop (pipeline/multicrop.py, pipeline/dali_multicrop.py) on the demo photos: the sampling
rule's ranges and determinism, the reference renderer's semantics, the path acting on global crop 2
only, the collated batch training a DINO-family method, and DALI vs reference parity of the local
crops with the tolerances of test_dali's whole-sample parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

# the parity tolerances and devices of the views' parity tests, so that the local crops meet the same bar
from test_dali import DEVICES, G_ATOL, VIEW_MAX, VIEW_MEAN

from pipeline.batch import Batch, DataConfig
from pipeline.dali_multicrop import batch_masks, build_local_pipeline, local_crops, render_local_batch
from pipeline.dali_multicrop import sample_local_params as sample_local_params_graph
from pipeline.dali_ops import sample_theta as dali_theta
from pipeline.demo import PHOTOS
from pipeline.errors import ConfigError
from pipeline.multicrop import (
    GREY,
    LOCAL_DIM,
    MULTICROP,
    MultiCropConfig,
    collate_multicrop,
    global_data_config,
    multicrop_sample,
    render_local_crops,
    sample_local_params,
    sample_masks,
    sample_multicrop,
    with_multicrop,
)
from pipeline.oracle import decode, normalize, sample_theta_for
from pipeline.path import CROP1, CROP2, IDX, PathConfig
from pipeline.shards import split_shards

# 32 px global crops and 16 px local crops at patch 8 keep every test a few seconds on a CPU.
SMALL = MultiCropConfig(n_local=4, global_size=32, local_size=16, patch_size=8)


def photos(n: int = 8) -> list[tuple[str, torch.Tensor]]:
    """n (key, decoded photo) pairs of different sizes, one per class (the camera class is greyscale)."""
    files = sorted(PHOTOS.glob("train/*/*_00.jpg"))[:n]
    return [(f.stem, decode(f.read_bytes(), f.name)) for f in files]


def denorm(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)


def box_stats(boxes: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) fractional boxes -> area fractions and aspect ratios (w/h in pixels)."""
    H, W = hw
    return boxes[:, 2] * boxes[:, 3], (boxes[:, 3] * W) / (boxes[:, 2] * H)


# ----------------------------------------------------------------------------------- sampling rule


@pytest.mark.parametrize("recipe", ["ibot", "dinov2", "dino"])
def test_local_params_respect_the_recipe(recipe):
    mc = dataclasses.replace(MULTICROP[recipe], n_local=2000)
    hw = (375, 500)
    p = sample_local_params(mc, hw, torch.Generator().manual_seed(0)).double()
    assert p.shape == (2000, LOCAL_DIM) and LOCAL_DIM == 19
    area, ratio = box_stats(p[:, CROP1], hw)
    y0, x0, h, w = p[:, CROP1].unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
    lo, hi = mc.local_scale
    # integer pixel boxes: the area fraction may miss the range by the rounding of h and w (< 1 px each)
    slack = 1 / 375 + 1 / 500
    assert area.min() >= lo - slack and area.max() <= hi + slack, (area.min(), area.max())
    assert area.max() > hi - 0.02 and area.min() < lo + 0.02  # the whole range is used
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert p[:, : IDX["ty_px"] + 1].abs().max() == 0  # local crops are never rotated or translated
    assert torch.equal(p[:, CROP2], torch.tensor([[0.0, 0, 1, 1]]).double().expand(2000, 4))
    jittered = p[:, IDX["brightness"] : IDX["hue"] + 1].ne(0).any(1)
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert p[:, IDX[name]].abs().max() <= getattr(mc, name) + 1e-6
        assert p[jittered, IDX[name]].abs().max() > 0.9 * getattr(mc, name)
    sigma = p[:, IDX["blur_sigma"]]
    blurred = sigma > 0
    assert sigma[blurred].min() >= 0.1 and sigma.max() <= 2.0
    # the probabilities: 2000 draws put each rate within ±0.04 of its p (> 4 standard deviations)
    for rate, want in [
        (jittered, 0.8),
        (blurred, 0.5),
        (p[:, IDX["flip1"]] > 0.5, 0.5),
        (p[:, GREY] > 0.5, 0.2),
    ]:
        assert abs(rate.double().mean() - want) < 0.04, (rate.double().mean(), want)
    assert set(p[:, GREY].tolist()) | set(p[:, IDX["flip1"]].tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("recipe", ["ibot", "dinov2"])
def test_global_crops_are_view1_and_view2_at_the_global_scale(recipe):
    mc = MULTICROP[recipe]
    data = global_data_config(DataConfig(img_size=64), mc)
    assert data.img_size == 224 and data.aug.crop_scale == mc.global_scale
    assert data.aug.rot_deg == PathConfig().rot_deg  # the path itself is untouched
    hw = (300, 400)
    areas = []
    for i in range(150):
        theta = sample_multicrop(f"k{i}", hw, data, mc, epoch=0).theta
        # θ is the reference loader's own draw for that sample: wiring multi-crop in leaves it unchanged
        assert torch.equal(theta, sample_theta_for(f"k{i}", hw, data, 0))
        areas += box_stats(torch.stack([theta[CROP1], theta[CROP2]]).double(), hw)[0].tolist()
    lo, hi = mc.global_scale
    assert min(areas) >= lo - 0.01 and max(areas) <= hi + 1e-6 and min(areas) < lo + 0.05


def test_same_seed_epoch_key_same_crops_and_masks():
    data = global_data_config(DataConfig(), MULTICROP["ibot"])
    mc = MULTICROP["ibot"]
    a = sample_multicrop("n01440764/x_1", (480, 640), data, mc, epoch=3)
    b = sample_multicrop("n01440764/x_1", (480, 640), data, mc, epoch=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for other in [
        sample_multicrop("n01440764/x_2", (480, 640), data, mc, epoch=3),
        sample_multicrop("n01440764/x_1", (480, 640), data, mc, epoch=4),
        sample_multicrop("n01440764/x_1", (480, 640), dataclasses.replace(data, seed=1), mc, epoch=3),
    ]:
        assert not torch.equal(a.local, other.local) and not torch.equal(a.theta, other.theta)
    # the local crops have a generator of their own: not a copy of θ's draws
    assert not torch.equal(a.local[0, :8], a.theta[:8])


def test_masks_per_global_crop():
    mc = MULTICROP["ibot"]
    masks = torch.stack([sample_masks(mc, 0, 0, f"k{i}") for i in range(64)])  # (64, 2, N)
    assert masks.shape == (64, 2, (224 // 16) ** 2) and masks.dtype == torch.bool
    ratio = masks.double().mean(-1).flatten()
    # iBOT's recipe: about half the crops unmasked, the others masked up to half their patches
    assert 0.3 < (ratio == 0).double().mean() < 0.7 and ratio.max() <= 0.5 and ratio.max() > 0.3
    assert torch.equal(masks[5], sample_masks(mc, 0, 0, "k5"))
    assert not sample_multicrop("k", (64, 64), DataConfig(), dataclasses.replace(mc, masks=False), 0).masks


def test_bad_config_is_one_config_error_naming_the_field():
    for field, value, match in [
        ("n_local", -1, "multicrop.n_local"),
        ("local_scale", (0.3, 0.2), "local_scale"),
        ("global_size", 100, "global_size=100 is not a multiple"),
        ("local_size", 90, "local_size=90 is not a multiple"),
        ("grey_p", 1.5, "grey_p"),
        ("blur_sigma", (0.0, 2.0), "blur_sigma"),
        ("saturation", 1.0, "saturation"),
    ]:
        with pytest.raises(ConfigError, match=match):
            global_data_config(DataConfig(), dataclasses.replace(MULTICROP["ibot"], **{field: value}))


# --------------------------------------------------------------------------------- reference render


def identity_params(n: int) -> torch.Tensor:
    """Local params for whole-image crops with no flip, jitter, greyscale or blur."""
    p = torch.zeros(n, LOCAL_DIM)
    p[:, CROP1] = p[:, CROP2] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return p


def test_render_local_crops_semantics():
    data = DataConfig()
    _, img = photos(1)[0]  # the astronaut: a colour photo
    p = identity_params(4)
    p[1, IDX["flip1"]] = 1
    p[2, GREY] = 1
    p[3, IDX["blur_sigma"]] = 1.5
    out = render_local_crops(img, p, SMALL, data)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    plain = F.resize(F.to_dtype(img, torch.float32, scale=True), [16, 16], antialias=True).clamp(0, 1)
    torch.testing.assert_close(out[0], normalize(plain, data), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], out[0].flip(-1), rtol=0, atol=1e-5)
    grey = denorm(out[2], data)
    assert (grey - grey[:1]).abs().max() < 1e-5 and (denorm(out[0], data).std(0)).max() > 0.01
    assert (out[3] - out[0]).abs().mean() > 0.01  # blurred
    assert out[3].std() < out[0].std()
    px = denorm(
        render_local_crops(
            img,
            sample_local_params(SMALL, tuple(img.shape[-2:]), torch.Generator().manual_seed(0)),
            SMALL,
            data,
        ),
        data,
    )
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5
    assert render_local_crops(img, torch.zeros(0, LOCAL_DIM), SMALL, data).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="params must be"):
        render_local_crops(img, torch.zeros(4, 18), SMALL, data)


def test_the_path_acts_on_global_crop_2_only():
    """Switching the path's rotation on changes view 2 and its targets only: view 1, the local crops and
    the masks are the same pixels, so the local crops are never rotated by θ."""
    rotated = global_data_config(DataConfig(aug=PathConfig(transforms=("rotation",), rot_deg=45.0)), SMALL)
    plain = global_data_config(DataConfig(aug=PathConfig(transforms=())), SMALL)
    for key, img in photos(3):
        a = multicrop_sample(img, key, rotated, SMALL, epoch=0)
        b = multicrop_sample(img, key, plain, SMALL, epoch=0)
        assert a[3][IDX["rot_deg"]].abs() > 1 and b[3][IDX["rot_deg"]] == 0
        for i in (0, 4, 5):  # view1, local, masks
            assert torch.equal(a[i], b[i]), i
        assert (a[1] - b[1]).abs().mean() > 0.05  # view2 rotated
        assert (a[2] - b[2]).abs().mean() > 0.02  # its targets too
        assert a[4].shape == (SMALL.n_local, 3, 16, 16) and a[5].shape == (2, 16)


# ---------------------------------------------------------------------------------------- collate


def rendered_batch(data: DataConfig, mc: MultiCropConfig, n: int = 4) -> Batch:
    samples = [multicrop_sample(img, key, data, mc, epoch=0) for key, img in photos(n)]
    views1, views2, targets, thetas, local, masks = zip(*samples)
    batch = Batch(
        torch.stack(views1),
        torch.stack(views2),
        torch.stack(targets),
        torch.stack(thetas),
        torch.full((n,), -1),
    )
    return collate_multicrop(batch, list(zip(local, masks)))


def test_collate_adds_local_and_masks_as_the_families_expect():
    data = global_data_config(DataConfig(), SMALL)
    batch = rendered_batch(data, SMALL)
    assert batch.local.shape == (4, SMALL.n_local, 3, 16, 16) and batch.masks.shape == (4, 2, 16)
    assert batch.view1.shape == (4, 3, 32, 32) and len(batch) == 4
    moved = batch.to("cpu")
    assert torch.equal(moved.local, batch.local) and torch.equal(moved.masks, batch.masks)
    no_masks = with_multicrop(batch, batch.local, None)
    assert no_masks.masks is None
    with pytest.raises(ValueError, match="expected \\(B=4, L, 3, h, w\\)"):
        with_multicrop(batch, batch.local[0], None)
    with pytest.raises(ValueError, match="expected bool \\(B=4, 2, N\\)"):
        with_multicrop(batch, None, batch.masks.float())


def test_a_rendered_multicrop_batch_trains_ibot_with_path(one_thread):
    import dataclasses

    from model import build_method
    from model.config import DinoConfig
    from train.recipes import load_config

    cfg = load_config("demo", ["--data.img_size=32", "--model.depth=2", "--model.expander=64,64"])
    assert cfg.model.patch_size == SMALL.patch_size
    data = global_data_config(cfg.data, SMALL)
    torch.manual_seed(0)
    head = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    method = build_method(dataclasses.replace(cfg.model, family="ibot", dino=head), data)
    out = method(rendered_batch(data, SMALL), teacher_temp=(0.04, 0.04))
    assert {"loss/inv.dino", "loss/inv.ibot", "loss/eq"} <= out.keys()
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.encoder.mask_token.grad is not None


# ----------------------------------------------------------------------------------- DALI parity


def device_id(device: str) -> int | None:
    return 0 if device == "gpu" else None


def max_mean(dali: torch.Tensor, ref: torch.Tensor, data: DataConfig) -> tuple[float, float]:
    """Max and mean |Δ| in [0, 1] pixels between (..., 3, h, w) crops."""
    d = (denorm(dali, data) - denorm(ref, data)).abs()
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", ["jitter", "grey", "blur", "all"])
def test_photometric_parity_on_identical_pixels(step, device):
    """Colour jitter, greyscale and blur alone: the photos are pre-sized to the local size and the box is
    the whole image, so both pipelines start from the same pixels (test_dali's g-parity bar)."""
    # each step always on, the others off ("all": the recipe's probabilities)
    only = {"jitter": (1, 0, 0), "grey": (0, 1, 0), "blur": (0, 0, 1)}.get(step)
    data, mc = DataConfig(), dataclasses.replace(SMALL, local_size=24)
    if only:
        mc = dataclasses.replace(mc, jitter_p=only[0], grey_p=only[1], blur_p=only[2])
    images = [F.resize(img, [24, 24], antialias=True) for _, img in photos()]
    params = [sample_local_params(mc, (24, 24), torch.Generator().manual_seed(i)) for i in range(len(images))]
    for p in params:
        p[:, CROP1] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    _, dali = render_local_batch(images, mc, data, params, device, device_id(device))
    ref = torch.stack([render_local_crops(img, p, mc, data) for img, p in zip(images, params)])
    mx, mean = max_mean(dali, ref, data)
    assert dali.shape == ref.shape == (8, 4, 3, 24, 24)
    assert mx <= G_ATOL, f"{step}: max |Δ| {mx:.2e} (mean {mean:.2e}) > {G_ATOL}"


@pytest.mark.parametrize("device", DEVICES)
def test_local_crop_parity_with_boxes_and_flips(device):
    """The whole local crop from the same decoded photos and parameters (random boxes, flips, jitter,
    greyscale, blur), against the reference: test_dali's whole-sample bar (DALI's antialiased
    downscaling differs slightly from torchvision's)."""
    data, mc = DataConfig(), dataclasses.replace(SMALL, local_size=40)
    keyed = photos()
    images = [img for _, img in keyed]
    params = [sample_multicrop(key, tuple(img.shape[-2:]), data, mc, 0).local for key, img in keyed]
    params[0][:, IDX["flip1"]] = 1.0  # flips and greyscale are exercised whatever the draws
    params[1][:, GREY] = 1.0
    _, dali = render_local_batch(images, mc, data, params, device, device_id(device))
    ref = torch.stack([render_local_crops(img, p, mc, data) for img, p in zip(images, params)])
    assert dali.shape == ref.shape == (8, 4, 3, 40, 40)
    mx, mean = max_mean(dali, ref, data)
    assert mean <= VIEW_MEAN and mx <= VIEW_MAX, f"local crops: max |Δ| {mx:.3f}, mean {mean:.2e}"


def test_dali_draws_the_local_params_by_the_same_rule():
    """The graph's own draws (what the loader uses): the recipe's ranges and rates, and the reference
    renders those parameters into the crops DALI rendered."""
    data, mc = DataConfig(), dataclasses.replace(MULTICROP["ibot"], n_local=8, local_size=16)
    keyed = photos()
    hwc = [img.permute(1, 2, 0).contiguous().numpy() for _, img in keyed]
    pipe = build_local_pipeline(lambda: hwc, len(hwc), mc, data, seed=0)
    pipe.build()
    runs = [pipe.run() for _ in range(3)]
    params = torch.stack([torch.from_numpy(r[0].as_array()) for r in runs])  # (3, B, L, LOCAL_DIM)
    local = torch.from_numpy(runs[0][1].as_array())  # (B, L, 3, h, w)
    p = params.flatten(0, 2).double()  # 192 draws
    assert params.shape == (3, 8, 8, LOCAL_DIM)
    assert not torch.equal(params[0], params[1])  # every batch draws afresh
    hw = torch.tensor([img.shape[-2:] for _, img in keyed]).double().repeat_interleave(8, 0).repeat(3, 1)
    area, ratio = box_stats(p[:, CROP1], (1, 1))
    ratio = ratio * hw[:, 1] / hw[:, 0]
    slack = 2 / hw.min()
    assert area.min() >= mc.local_scale[0] - slack and area.max() <= mc.local_scale[1] + slack
    assert ratio.min() >= 3 / 4 - 0.03 and ratio.max() <= 4 / 3 + 0.03
    assert p[:, : IDX["ty_px"] + 1].abs().max() == 0
    assert torch.equal(p[:, CROP2], torch.tensor([[0.0, 0, 1, 1]]).double().expand(len(p), 4))
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert p[:, IDX[name]].abs().max() <= getattr(mc, name) + 1e-6
    sigma = p[:, IDX["blur_sigma"]]
    assert sigma[sigma > 0].min() >= 0.1 and sigma.max() <= 2.0
    jittered = p[:, IDX["brightness"] : IDX["hue"] + 1].ne(0).any(1)
    for rate, want in [
        (jittered, 0.8),
        (sigma > 0, 0.5),
        (p[:, IDX["flip1"]] > 0.5, 0.5),
        (p[:, GREY] > 0.5, 0.2),
    ]:
        assert abs(rate.double().mean() - want) < 0.1, (rate.double().mean(), want)
    ref = torch.stack([render_local_crops(img, q, mc, data) for (_, img), q in zip(keyed, params[0])])
    mx, mean = max_mean(local, ref, data)
    assert mean <= VIEW_MEAN and mx <= VIEW_MAX, f"in-graph params: max |Δ| {mx:.3f}, mean {mean:.2e}"


def test_dali_batch_masks():
    masks = batch_masks(MULTICROP["ibot"], 0, 1, 0, 5, 16)
    assert masks.shape == (16, 2, 196) and masks.dtype == torch.bool
    assert torch.equal(masks, batch_masks(MULTICROP["ibot"], 0, 1, 0, 5, 16))
    assert not torch.equal(masks, batch_masks(MULTICROP["ibot"], 0, 1, 0, 6, 16))
    assert not torch.equal(masks, batch_masks(MULTICROP["ibot"], 0, 1, 1, 5, 16))  # another rank
    assert batch_masks(MULTICROP["dino"], 0, 1, 0, 5, 16) is None


def test_dali_draws_follow_the_pipeline_seed():
    data, mc = DataConfig(), dataclasses.replace(SMALL, n_local=2)
    images = [img for _, img in photos(2)]
    a, crops_a = render_local_batch(images, mc, data, seed=5)
    b, crops_b = render_local_batch(images, mc, data, seed=5)
    c, _ = render_local_batch(images, mc, data, seed=6)
    assert torch.equal(a, b) and torch.equal(crops_a, crops_b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="need 2 params of shape \\(2, 19\\)"):
        render_local_batch(images, mc, data, [a[0, :1], a[1]])


def test_local_crops_in_a_checkpointed_reader_graph(demo_shards):
    """The wiring the DALI loader needs: local crops from the reader's decoded image, beside the views'
    θ; a pipeline restored from a checkpoint continues with the same crops."""
    from nvidia.dali import Pipeline, fn, types

    data, mc = DataConfig(), dataclasses.replace(SMALL, n_local=2)
    files = [Path(s.path) for s in split_shards(demo_shards, "train", indexed=True)]

    def pipeline(checkpoint=None):
        pipe = Pipeline(
            batch_size=4,
            num_threads=1,
            device_id=None,
            seed=3,
            enable_checkpointing=True,
            checkpoint=checkpoint,
            prefetch_queue_depth=1,
        )
        with pipe:
            jpg = fn.readers.webdataset(
                paths=[str(f) for f in files],
                ext=["jpg"],
                random_shuffle=True,
                index_paths=[str(f.with_suffix(".idx")) for f in files],
                initial_fill=8,
            )
            shape = fn.cast(fn.peek_image_shape(jpg, adjust_orientation=False), dtype=types.FLOAT)
            img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB, adjust_orientation=False)
            theta = dali_theta(shape[0], shape[1], data.aug)
            params = sample_local_params_graph(shape[0], shape[1], mc)
            pipe.set_outputs(theta, params, local_crops(img, params, shape[0], shape[1], mc, data, "cpu"))
        pipe.build()
        return pipe

    def arrays(outs):
        return [torch.from_numpy(np.array(o.as_array())) for o in outs]

    pipe = pipeline()
    first = arrays(pipe.run())
    assert first[2].shape == (4, 2, 3, 16, 16) and first[1].shape == (4, 2, LOCAL_DIM)
    cpt = pipe.checkpoint()
    second = arrays(pipe.run())
    resumed = arrays(pipeline(cpt).run())
    for want, got in zip(second, resumed):
        assert torch.equal(want, got)
    assert not torch.equal(first[1], second[1])


# ------------------------------------------------------------------------- both loaders, wired in


def _loader_cfg(demo_shards, loader: str) -> DataConfig:
    data = DataConfig(dir=str(demo_shards), loader=loader, batch_size=16, workers=1, shuffle_buffer=16)
    return global_data_config(data, dataclasses.replace(SMALL, enabled=True))


@pytest.mark.integration
def test_both_loaders_yield_multicrop_batches_alike(demo_shards):
    """build_loader with data.multicrop: the reference and the DALI loader give the same fields and
    shapes, local crops with matching pixel statistics over an epoch, and iBOT masks with iBOT's ratios."""
    from pipeline import build_loader

    epochs = {}
    for name in ("reference", "dali"):
        batches = list(build_loader(_loader_cfg(demo_shards, name), device="cpu"))
        assert len(batches) == 4
        for b in batches:
            assert b.local.shape == (16, 4, 3, 16, 16) and b.local.dtype == torch.float32
            assert b.masks.shape == (16, 2, 16) and b.masks.dtype == torch.bool
            assert b.view1.shape == b.view2.shape == (16, 3, 32, 32)
        epochs[name] = batches
    for name, batches in epochs.items():
        local = torch.cat([b.local for b in batches])  # (64, 4, 3, 16, 16)
        ratios = torch.cat([b.masks for b in batches]).float().mean(-1).flatten()  # (128,) per global crop
        assert 0.3 < (ratios == 0).float().mean() < 0.7, name  # half of the crops unmasked, as iBOT
        assert ratios.max() <= 0.5 + 1 / 16, name
        epochs[name] = (local.mean((0, 1, 3, 4)), local.std((0, 1, 3, 4)))
    (m_ref, s_ref), (m_dali, s_dali) = epochs["reference"], epochs["dali"]
    # the same distribution of crops and photometric draws over the same 64 photos (not the same draws)
    torch.testing.assert_close(m_dali, m_ref, atol=0.15, rtol=0)
    torch.testing.assert_close(s_dali, s_ref, atol=0.15, rtol=0)


def test_the_dali_loader_resumes_its_local_crops_and_masks(demo_shards):
    from pipeline.dali import build_dali_loader

    cfg = _loader_cfg(demo_shards, "dali")
    straight = list(build_dali_loader(cfg, demo_shards))
    first = build_dali_loader(cfg, demo_shards)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    resumed = build_dali_loader(cfg, demo_shards)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for a, b in zip(rest, straight[2:]):
        assert (
            torch.equal(a.local, b.local) and torch.equal(a.masks, b.masks) and torch.equal(a.view2, b.view2)
        )


def test_batch_to_and_pin_memory_keep_the_multicrop_fields():
    base = Batch(
        *(torch.zeros(2, 3, 4, 4) for _ in range(3)), torch.zeros(2, 19), torch.zeros(2, dtype=torch.long)
    )
    full = with_multicrop(base, torch.ones(2, 1, 3, 2, 2), torch.ones(2, 2, 4, dtype=torch.bool))
    for batch in (base, full):
        moved = batch.to("cpu", non_blocking=False)
        assert type(moved) is Batch and (moved.local is None) == (batch.local is None)
        assert (moved.masks is None) == (batch.masks is None)
    assert torch.equal(full.to("cpu").masks, full.masks) and full.to("cpu").masks.dtype == torch.bool
    if torch.cuda.is_available():  # pinning needs a CUDA runtime
        pinned = full.pin_memory()
        assert pinned.local.is_pinned() and pinned.masks.is_pinned() and base.pin_memory().local is None
