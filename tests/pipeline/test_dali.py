"""The DALI pipeline on the demo shards: Batch contract, epochs and ranks, seeds, resume, errors, and
parity with the PyTorch reference (pipeline.reference) on identical decoded pixels and θ.

Parity tolerances (pixels in [0, 1], compared where the warp read inside the source image, i.e. away
from the `fill` border):
  * g alone (u identical in both: the images are pre-sized and the crop is the whole image): colour,
    blur and the affine warp agree to float rounding, max |Δ| <= G_ATOL.
  * the whole sample (random crops and flips): DALI's antialiased downscaling filter differs slightly
    from torchvision's (PIL-style) one, so u already differs by up to a few grey levels at sharp edges;
    mean |Δ| <= VIEW_MEAN and max |Δ| <= VIEW_MAX. Upscaling crops agree to float rounding.
The GPU runs the same checks (marker `gpu`); nvJPEG differences are excluded by feeding decoded pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as F

from pipeline import build_loader, dali_available
from pipeline.batch import DataConfig
from pipeline.dali import DaliLoader, build_dali_loader, render_batch
from pipeline.demo import PHOTOS
from pipeline.errors import ShardError
from pipeline.oracle import decode, make_views
from pipeline.path import IDX, THETA_DIM, PathConfig, affine_matrix, path_steps, sample_theta
from pipeline.reference import ReferenceLoader
from pipeline.shards import parse_labels, verify_shard

G_ATOL = 5e-4
VIEW_MEAN, VIEW_MAX = 2e-3, 0.1
FAMILIES = [
    ("color",),
    ("blur",),
    ("rotation",),
    ("translation",),
    ("rotation", "translation", "color", "blur"),
]
DEVICES = [
    "cpu",
    pytest.param(
        "gpu",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
pytestmark = NEEDS_DALI


def small_cfg(data: Path | str = "", **aug) -> DataConfig:
    return DataConfig(
        dir=str(data),
        batch_size=8,
        workers=1,
        img_size=32,
        target_size=24,
        shuffle_buffer=16,
        aug=PathConfig(**aug),
    )


def photos(n: int = 8) -> list[torch.Tensor]:
    """n decoded demo photos of different sizes, one per class (the camera class is greyscale)."""
    files = sorted(PHOTOS.glob("train/*/*_00.jpg"))[:n]
    return [decode(f.read_bytes(), f.name) for f in files]


def denorm(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return x * std + mean


def valid_region(theta: torch.Tensor, t: float, size: int, cfg: PathConfig) -> torch.Tensor:
    """(B, size, size) bool: output pixels whose source point lies >= 1 px inside the warped image."""
    m = affine_matrix(theta[:, :8] * t, (size, size), cfg.ref_size)  # (B, 2, 3)
    c = torch.arange(size, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1)  # (S, S, 3)
    src = torch.einsum("hwk,bik->bhwi", pts, m)
    return ((src >= 1) & (src <= size - 1)).all(-1)


def compare(dali: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, what: str) -> tuple[float, float]:
    """Max and mean |Δ| over the masked pixels of (B, 3, H, W) images."""
    d = (dali - ref).abs().amax(1)[mask]
    assert d.numel() > 0.3 * mask.numel(), f"{what}: valid region too small to compare"
    return float(d.max()), float(d.mean())


# ------------------------------------------------------------------------------------ Batch contract


def test_batch_shapes_dtypes_ranges_and_labels(demo_shards):
    cfg = small_cfg(demo_shards)
    loader = build_dali_loader(cfg, demo_shards)
    assert len(loader) == 64 // 8
    labels = []
    for batch in loader:
        assert batch.view1.shape == batch.view2.shape == (8, 3, 32, 32)
        assert batch.targets.shape == (8, 2, 3, 24, 24)
        assert batch.theta.shape == (8, THETA_DIM) and batch.label.shape == (8,)
        assert batch.view1.dtype == batch.targets.dtype == batch.theta.dtype == torch.float32
        assert batch.label.dtype == torch.int64
        for x in (batch.view1, batch.view2, batch.targets):
            px = denorm(x, cfg)
            assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4
        th = batch.theta
        aug = cfg.aug
        assert th[:, IDX["rot_deg"]].abs().max() <= aug.rot_deg
        assert th[:, IDX["tx_px"] : IDX["ty_px"] + 1].abs().max() <= aug.translate_px
        assert th[:, IDX["hue"]].abs().max() <= aug.hue
        sigma = th[:, IDX["blur_sigma"]]
        assert sigma.min() >= aug.blur_sigma[0] and sigma.max() <= aug.blur_sigma[1]
        for box in (th[:, 8:12], th[:, 13:17]):
            y0, x0, h, w = box.unbind(1)
            assert (
                (y0 >= 0).all()
                and (x0 >= 0).all()
                and (y0 + h <= 1 + 1e-6).all()
                and (x0 + w <= 1 + 1e-6).all()
            )
            assert (h * w >= aug.crop_scale[0] - 0.02).all()
        assert set(th[:, IDX["flip1"]].tolist()) <= {0.0, 1.0}
        labels += batch.label.tolist()
    # one epoch on one rank reads every sample once: the labels are exactly the dataset's
    meta = json.loads((demo_shards / "dataset.json").read_text())
    want = [
        c for s in meta["shards"] if s["split"] == "train" for _, c in verify_shard(demo_shards / s["name"])
    ]
    assert sorted(labels) == sorted(want)


def test_inactive_families_are_identity_and_k0(demo_shards):
    cfg = small_cfg(demo_shards, transforms=("rotation",), k=0)
    batch = next(iter(build_dali_loader(cfg, demo_shards)))
    assert batch.targets.shape == (8, 0, 3, 24, 24)
    assert batch.theta[:, 1:8].abs().max() == 0  # translation, colour and blur at identity
    assert batch.theta[:, 0].abs().max() > 0


def test_parse_labels():
    raw = torch.zeros(4, 16, dtype=torch.uint8)
    for i, text in enumerate([b"7", b"123", b"", b"x"]):
        raw[i, : len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    assert parse_labels(raw).tolist() == [7, 123, -1, -1]


def test_build_loader_picks_dali_by_default(demo_shards):
    cfg = small_cfg(demo_shards)
    assert isinstance(build_loader(cfg, device="cpu"), DaliLoader)
    cfg.loader = "reference"
    assert isinstance(build_loader(cfg, device="cpu"), ReferenceLoader)


# ------------------------------------------------------------------------------ epochs, ranks, seeds


def fingerprints(loader) -> list[tuple]:
    """One key per sample: with whole-image crops and no flips, view 1 identifies the photo."""
    return [tuple(v.flatten()[::97].mul(100).round().tolist()) for b in loader for v in b.view1]


@pytest.mark.parametrize("world", [2, 3])
def test_epoch_length_and_rank_split_without_overlap(demo_shards, world):
    cfg = small_cfg(demo_shards, crop_scale=(1.0, 1.0), crop_ratio=(0.1, 10.0), flip_p=0.0)
    cfg.batch_size = 4 * world
    seen = []
    for rank in range(world):
        loader = build_dali_loader(cfg, demo_shards, rank, world)
        assert len(loader) == 64 // world // 4  # the same on every rank; partial batches dropped
        keys = fingerprints(loader)
        assert len(keys) == len(loader) * 4 == len(set(keys))
        seen.append(set(keys))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b], f"ranks {a} and {b} read the same samples"


def test_same_seed_same_batches_other_seed_other_theta(demo_shards):
    cfg = small_cfg(demo_shards)
    a = [b for _, b in zip(range(2), build_dali_loader(cfg, demo_shards))]
    b = [b for _, b in zip(range(2), build_dali_loader(cfg, demo_shards))]
    for x, y in zip(a, b):
        for name in ("view1", "view2", "targets", "theta", "label"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    cfg.seed = 1
    c = next(iter(build_dali_loader(cfg, demo_shards)))
    assert not torch.equal(a[0].theta, c.theta)


def test_set_epoch_reshuffles_and_resume_continues_exactly(demo_shards):
    cfg = small_cfg(demo_shards)
    full = build_dali_loader(cfg, demo_shards)
    full.set_epoch(1)
    want = [b.theta for b in full]
    first = build_dali_loader(cfg, demo_shards)
    first.set_epoch(0)
    assert not torch.equal(next(iter(first)).theta, want[0])

    part = build_dali_loader(cfg, demo_shards)
    part.set_epoch(1)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))  # survives a checkpoint file
    assert state["epoch"] == 1 and state["batch"] == 3
    del it
    resumed = build_dali_loader(cfg, demo_shards)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's call at the top of the epoch keeps the position
    rest = [b.theta for b in resumed]
    assert len(rest) == len(want) - 3
    for got, ref in zip(rest, want[3:]):
        assert torch.equal(got, ref)
    end = resumed.state_dict()
    assert (end["epoch"], end["batch"]) == (1, len(want))
    # a run checkpointed on the epoch's last batch resumes into an empty remainder, then moves on
    again = build_dali_loader(cfg, demo_shards)
    again.load_state_dict(end)
    assert list(again) == []
    again.set_epoch(2)
    assert len(list(again)) == len(want)


# ------------------------------------------------------------------------------------------- errors


@pytest.fixture
def shard_copy(demo_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out


def test_missing_shard_or_index_is_named(shard_copy):
    (shard_copy / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match="train-000003.tar"):
        build_dali_loader(small_cfg(shard_copy), shard_copy)
    shutil.copy(shard_copy / "train-000002.tar", shard_copy / "train-000003.tar")
    (shard_copy / "train-000005.idx").unlink()
    with pytest.raises(ShardError, match="train-000005.idx"):
        build_dali_loader(small_cfg(shard_copy), shard_copy)


def test_truncated_shard_is_named(shard_copy):
    tar = shard_copy / "train-000004.tar"
    tar.write_bytes(tar.read_bytes()[:4096])
    with pytest.raises(ShardError, match="train-000004.tar is truncated"):
        build_dali_loader(small_cfg(shard_copy), shard_copy)


def test_corrupt_jpeg_is_named(shard_copy):
    tar = shard_copy / "train-000001.tar"
    fields = tar.with_suffix(".idx").read_text().splitlines()[1].split()
    offset, size = int(fields[1]), int(fields[2])
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = bytes(size)  # same length: the index still fits, the JPEG is gone
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard .*train-000001.tar is corrupt"):
        for _ in build_dali_loader(small_cfg(shard_copy), shard_copy):
            pass


# ------------------------------------------------------------------------------ parity with reference


def reference_views(images, theta, cfg):
    views = [make_views(im, th, cfg) for im, th in zip(images, theta)]
    return [torch.stack([v[i] for v in views]) for i in range(3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("families", FAMILIES, ids="+".join)
def test_g_parity_on_identical_u(families, device):
    """g_θ and g_θk alone: u is the same pre-sized image in both pipelines."""
    cfg = DataConfig(img_size=48, aug=PathConfig(transforms=families))
    images = [F.resize(im, [48, 48], antialias=True) for im in photos()]
    theta = sample_theta(
        cfg.aug, torch.full((len(images), 2), 48.0, dtype=torch.float64), torch.Generator().manual_seed(3)
    )
    theta[:, 8:18] = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.float32)  # whole image, no flip
    _, v2, tg = render_batch(images, theta, cfg, device, 0 if device == "gpu" else None)
    _, r2, rt = reference_views(images, theta, cfg)
    worst = []
    for t, a, b in [(1.0, v2, r2)] + [
        (float(t), tg[:, k], rt[:, k]) for k, t in enumerate(path_steps(cfg.aug.k))
    ]:
        mx, mean = compare(denorm(a, cfg), denorm(b, cfg), valid_region(theta, t, 48, cfg.aug), f"t={t}")
        worst.append(mx)
        assert mx <= G_ATOL, f"{families} t={t:.3f}: max |Δ| {mx:.2e} (mean {mean:.2e}) > {G_ATOL}"
    print(f"{families}: max |Δ| per output {[f'{w:.1e}' for w in worst]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("families", FAMILIES, ids="+".join)
def test_sample_parity_with_crops_and_flips(families, device):
    """view 1, view 2 and every target from the same decoded photos and θ (random crops, flips)."""
    cfg = DataConfig(img_size=56, target_size=40, aug=PathConfig(transforms=families))
    images = photos()
    sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.float64)
    theta = sample_theta(cfg.aug, sizes, torch.Generator().manual_seed(7))
    theta[:4, IDX["flip2"]] = 1.0  # make sure flips of u are exercised
    v1, v2, tg = render_batch(images, theta, cfg, device, 0 if device == "gpu" else None)
    r1, r2, rt = reference_views(images, theta, cfg)
    outputs = [
        ("view1", v1, r1, torch.ones(len(images), 56, 56, dtype=torch.bool)),
        ("view2", v2, r2, valid_region(theta, 1.0, 56, cfg.aug)),
    ]
    for k, t in enumerate(path_steps(cfg.aug.k).tolist()):
        outputs.append((f"target{k + 1}", tg[:, k], rt[:, k], valid_region(theta, t, 40, cfg.aug)))
    for name, a, b, mask in outputs:
        assert a.shape == b.shape, name
        mx, mean = compare(denorm(a, cfg), denorm(b, cfg), mask, name)
        assert mean <= VIEW_MEAN and mx <= VIEW_MAX, f"{families} {name}: max |Δ| {mx:.3f}, mean {mean:.2e}"
