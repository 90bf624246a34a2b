"""The probes: R² formulas, the MLP regressor on informative and uninformative features, the pairs
(path semantics, the disc mask, the symmetry filter), the baselines, the equivariance probe end to end
with synthetic backbones, loading checkpoints and exports, and the CLI on the demo photos."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import r2_score
from torch import nn

from model import build_method
from pipeline import pairs as P
from pipeline.errors import ProbeError, UserError
from pipeline.oracle import apply_g, crop_resize, decode
from pipeline.path import IDX, PathConfig, sample_theta
from train import backbones, checkpoint, probe, probe_embed, probe_fit, probes
from train.config import to_dict
from train.recipes import load_config

# A narrower head than the protocol's keeps each fit around a second on a shared 2-core CPU.
FAST = probe_fit.FitConfig(hidden=128, epochs=100, patience=15)
CPU = torch.device("cpu")


# Small matmuls on a CPU shared with other jobs run far faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_r2_formulas_match_sklearn_and_sie():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(50, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0.0, 5.0, -1.0])
    pred = y + 0.3 * torch.randn(50, 3, generator=gen)
    assert probe_fit.r2_per_dim(pred, y) == pytest.approx(
        r2_score(y.double().numpy(), pred.double().numpy()), abs=1e-9
    )
    sie = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert probe_fit.r2_global(pred, y) == pytest.approx(float(sie), abs=1e-6)
    # The two differ when the dimensions have different scales: the global mean inflates SS_tot.
    assert probe_fit.r2_global(pred, y) > probe_fit.r2_per_dim(pred, y) + 0.05
    # 1-D: identical; a constant dimension predicted exactly scores 1 (scikit-learn's convention).
    assert probe_fit.r2_per_dim(pred[:, :1], y[:, :1]) == pytest.approx(
        probe_fit.r2_global(pred[:, :1], y[:, :1])
    )
    const = torch.ones(10, 1)
    assert probe_fit.r2_per_dim(const, const) == 1.0


def _pairs(n_images: int, per_image: int, d: int, gen: torch.Generator):
    theta = torch.rand(n_images * per_image, 2, generator=gen) * 2 - 1
    groups = torch.arange(n_images).repeat_interleave(per_image)
    base = torch.randn(n_images, d, generator=gen)[groups]  # the source image's content
    return theta, groups, base


def test_regress_r2_near_one_when_features_encode_theta():
    gen = torch.Generator().manual_seed(1)
    theta, groups, base = _pairs(100, 6, 16, gen)
    mix = torch.randn(2, 16, generator=gen)
    f1, f2 = base, base + theta @ mix  # the pair's difference is a linear image of θ
    out = probe_fit.regress_r2(f1, f2, theta, groups, fit=FAST)
    assert out["r2"] > 0.95 and out["r2_sie"] > 0.95, out
    assert out["n_train"] + out["n_test"] == len(theta)


def test_regress_r2_near_zero_when_features_ignore_theta():
    gen = torch.Generator().manual_seed(2)
    theta, groups, base = _pairs(100, 6, 16, gen)
    f1, f2 = base, base + 0.5 * torch.randn(base.shape, generator=gen)
    out = probe_fit.regress_r2(f1, f2, theta, groups, fit=FAST)
    assert abs(out["r2"]) < 0.1 and abs(out["r2_sie"]) < 0.1, out


def test_regress_r2_splits_by_image():
    # Features identify the image, θ is one value per image: a pair-level split would let the MLP look
    # θ up from the image identity; the image-level split must not.
    gen = torch.Generator().manual_seed(3)
    _, groups, base = _pairs(100, 6, 16, gen)
    per_image_theta = torch.rand(100, 2, generator=gen)[groups]
    out = probe_fit.regress_r2(base, base, per_image_theta, groups, fit=FAST)
    assert out["r2"] < 0.3, out


def test_linear_and_knn_top1_on_separable_toy_set():
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 8, generator=gen) * 4

    def split(n):
        y = torch.arange(4).repeat(n // 4)
        return centres[y] + torch.randn(len(y), 8, generator=gen), y

    (f_tr, y_tr), (f_va, y_va) = split(200), split(80)
    assert probe_fit.linear_top1(f_tr, y_tr, f_va, y_va) > 0.95
    assert probe_fit.knn_top1(f_tr, y_tr, f_va, y_va) > 0.95
    noise = torch.randn(f_va.shape, generator=gen)
    assert probe_fit.linear_top1(f_tr, y_tr, noise, y_va) < 0.6  # chance is 0.25


# --- end to end: pairs rendered by the reference pipeline, embedded by synthetic backbones ---------


def _blob_jpegs(n: int, size: int = 48, seed: int = 0, pad: int = 0) -> list[tuple[bytes, int]]:
    """Grey Gaussian blobs at random off-centre positions on black: their centroid tracks rotation
    about the centre and translation exactly, as long as the blob stays inside the frame. pad: black
    columns added left and right (a wider image, whose centre view is still the blob's square)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, -pad : size + pad] + 0.5
    samples = []
    for _ in range(n):
        r, a = rng.uniform(6, 12), rng.uniform(0, 2 * np.pi)
        cx, cy = size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.0**2))
        buf = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8)).convert("RGB").save(buf, "JPEG", quality=95)
        samples.append((buf.getvalue(), 0))
    return samples


class Centroid(nn.Module):
    """Features that encode rotation and translation exactly: the intensity centroid (x, y) relative
    to the image centre, in pixels."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = x.float().mean(1)  # (B, 3, H, W) -> (B, H, W)
        H, W = m.shape[-2:]
        mass = m.sum((1, 2)).clamp_min(1e-6)
        cy = (m.sum(2) * (torch.arange(H) + 0.5)).sum(1) / mass
        cx = (m.sum(1) * (torch.arange(W) + 0.5)).sum(1) / mass
        return {"all": torch.stack([cx - W / 2, cy - H / 2], dim=1)}  # (B, 2)


class Blind(nn.Module):
    """Features independent of the image and so of θ."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"all": torch.randn(len(x), 8, generator=self.gen)}


def _cfg(**kw) -> probes.ProbeConfig:
    base = {
        "size": 48,
        "per_image": 8,
        "seeds": (0, 1, 2),
        "aug": PathConfig(ref_size=48),
        "mask": "none",
        "pool": "mean",
        "baselines": (),
        "group_by": "image",
    }
    return probes.ProbeConfig(**(base | kw))


def test_equivariance_probe_end_to_end_with_synthetic_backbones(monkeypatch):
    monkeypatch.setitem(probe_fit.PROTOCOLS, "fast", FAST)
    samples = _blob_jpegs(40)
    # translations of ±10 px at 48 px keep the blob inside the frame. The ridge readout (default) is
    # linear in [f(x), f(x')]: translation = c' - c exactly; the rotation angle is not linear in the
    # centroids, so the MLP readout reads it.
    exact = probes.equivariance(
        {"backbone": Centroid(), "random": Blind()},
        samples,
        _cfg(transforms=("translation",)),
        CPU,
        quiet=True,
    )
    assert {k: exact["pairs"][k] for k in ("images", "photos", "per_image", "per_family")} == {
        "images": 40,
        "photos": 40,
        "per_image": 8,
        "per_family": 320,
    }
    by_model = exact["results"]["translation"]["none/mean"]
    assert (
        by_model["backbone"]["all"]["r2"] > 0.98 and len(by_model["backbone"]["all"]["r2_assignments"]) == 4
    )
    assert abs(by_model["random"]["all"]["r2"]) < 0.1, by_model["random"]
    d = by_model["backbone"]["all"]["vs"]["random"]  # paired over the same 4 fold assignments
    assert d["positive"] == d["of"] == 4 and d["diff"] > 0.9
    mlp = probes.equivariance(
        {"backbone": Centroid()}, samples, _cfg(transforms=("rotation",), protocol="fast"), CPU, quiet=True
    )
    assert mlp["results"]["rotation"]["none/mean"]["backbone"]["all"]["r2"] > 0.95, mlp
    blind = probes.equivariance({"backbone": Blind()}, samples, _cfg(), CPU, quiet=True)
    for family, by_setting in blind["results"].items():
        r = by_setting["none/mean"]["backbone"]["all"]
        # ≈ 0 within the spread the table prints (4 fold assignments), and never far off
        assert abs(r["r2"]) < max(0.1, 3 * r["r2_std"]), (family, r)
    assert "translation" in probe.format_equivariance(exact) and "- random" in probe.format_equivariance(
        exact
    )


class Counting(nn.Module):
    """Pooled features of a tiny fixed random projection; records a hash of every image it embeds."""

    def __init__(self):
        super().__init__()
        self.seen: list[bytes] = []
        self.proj = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(0))

    def pooled(self, x, pools):
        self.seen += [img.numpy().tobytes() for img in x.half()]
        f = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj
        return {pool: {"all": f} for pool in pools}


def test_no_rendering_is_embedded_twice():
    samples = _blob_jpegs(8, pad=6)  # not square: the centre and whole views differ
    cfg = _cfg(
        transforms=("rotation", "translation", "color", "crop", "flip"),
        mask="disc,none",
        pool="mean,grid2",
        per_image=3,
        group_by="image",
    )
    model = Counting()
    out = probes.equivariance({"backbone": model}, samples, cfg, CPU, quiet=True)
    # masks: rotation and translation under both, colour under the first, crop and flip unmasked
    assert {f: list(r) for f, r in out["results"].items()} == {
        "rotation": ["disc/mean", "disc/grid2", "none/mean", "none/grid2"],
        "translation": ["disc/mean", "disc/grid2", "none/mean", "none/grid2"],
        "color": ["disc/mean", "disc/grid2"],
        "crop": ["none/mean", "none/grid2"],
        "flip": ["none/mean", "none/grid2"],
    }
    # anchors: centre/disc, centre/none, whole/none, once each; x2: 7 pair sets of 8 x 3; one forward
    # pass serves both pools
    want = 3 * 8 + 7 * 8 * 3
    assert len(model.seen) == want == out["speed"]["images_embedded"]
    assert len(set(model.seen)) == len(model.seen)  # no rendering twice
    assert out["speed"]["images_per_s"] > 0


def test_pair_count_rule_follows_the_readout():
    ridge, mlp = probes.ProbeConfig(), probes.ProbeConfig(protocol="fast")
    # ridge: 300 train pairs, 3 of 4 folds train; the MLP protocol: 5000, 70 % train (the old rule)
    assert ridge.pairs_per_image(30) == 14 and mlp.pairs_per_image(30) == 239
    assert ridge.pairs_per_image(1000) == 2  # at least two pairs per image
    assert probes.ProbeConfig(min_train_pairs=600).pairs_per_image(30) == 27
    assert probes.ProbeConfig(per_image=5).pairs_per_image(30) == 5
    assert "30 images x 14 = 420 pairs" in ridge.pair_rule(30) and "ridge readout" in ridge.pair_rule(30)


def test_mlp_early_stop_never_keeps_the_untrained_head():
    # Targets that are noise: every trained epoch validates worse than the untrained head (which
    # predicts the mean); the head must still be a trained one, not the zero-initialised start.
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 8, generator=gen), torch.randn(200, 1, generator=gen)
    head = probe_fit.mlp(8, 1, 16)
    cfg = replace(FAST, hidden=16, epochs=3, patience=1)
    pred = probe_fit.fit_predict(
        head, x, y, x[:20], torch.nn.functional.mse_loss, cfg, torch.arange(200) // 4
    )
    assert pred.std() > 0, "the untrained (zero last layer) head was kept"


def test_unlabeled_samples_fall_back_to_one_group_per_image():
    samples = [(jpg, -1) for jpg, _ in _blob_jpegs(6)]
    groups, why = probes.grouping(samples, "photo")
    assert groups == list(range(6)) and "unlabeled" in why
    out = probes.equivariance(
        {"backbone": Centroid()},
        samples,
        _cfg(transforms=("translation",), group_by="photo"),
        CPU,
        quiet=True,
    )
    assert "unlabeled" in out["pairs"]["grouping"] and out["pairs"]["photos"] == 6
    assert "only 6 source photos" in out["pairs"]["warning"]


def test_seeds_change_the_fit_not_the_pairs():
    samples = _blob_jpegs(6)
    cfg = PathConfig(ref_size=48)
    a = P.render_family(samples, "rotation", cfg, 48, 4, seed=0)["disc"]
    b = P.render_family(samples, "rotation", cfg, 48, 4, seed=0)["disc"]
    assert torch.equal(a.x2, b.x2) and torch.equal(a.theta, b.theta)
    gen = torch.Generator().manual_seed(0)
    theta, groups, base = _pairs(40, 6, 16, gen)
    f2 = base + theta @ torch.randn(2, 16, generator=gen) + 0.5 * torch.randn(base.shape, generator=gen)
    runs = probe_fit.over_seeds(base, f2, theta, groups, FAST, (0, 1, 2))
    assert len(set(runs["r2_seeds"])) == 3 and runs["r2_std"] > 0, runs


def test_pairs_follow_the_path_semantics():
    samples = _blob_jpegs(3)
    cfg = PathConfig(ref_size=48)
    pairs = P.render_family(samples, "rotation", cfg, 48, per_image=4, seed=0, masks=("none",))["none"]
    assert (
        pairs.x2.shape == (12, 3, 48, 48)
        and pairs.theta.shape == (12, 1)
        and pairs.x1.shape == (3, 3, 48, 48)
    )
    assert (
        pairs.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        and pairs.anchor.tolist() == pairs.groups.tolist()
    )
    assert pairs.theta.abs().max() <= cfg.rot_deg and pairs.theta.std() > 0
    # Image 0's pairs are g_θ(centre view) for θ drawn by pipeline.path with only rotation active,
    # rendered by the reference pipeline: one semantics for training and probing.
    rot_only = replace(cfg, transforms=("rotation",))
    full = sample_theta(rot_only, torch.tensor([[48, 48]] * 4), torch.Generator().manual_seed(0))
    assert torch.equal(pairs.theta[:4, 0], full[:, IDX["rot_deg"]])
    assert (full[:, IDX["tx_px"] : IDX["blur_sigma"] + 1] == 0).all()  # no other family leaks in
    x = crop_resize(decode(samples[0][0]), P.centre_box((48, 48)), False, 48)
    want = apply_g(x[None].expand(4, -1, -1, -1).contiguous(), full, rot_only)
    assert torch.allclose(pairs.x2[:4].float(), want, atol=2e-3)  # float16 storage
    # crop: the θ entries are A2's crop box (y0, x0, h, w) inside the image; flip: 0 or 1, both drawn.
    box = P.render_family(samples, "crop", cfg, 48, per_image=4, masks=("none",))["none"].theta
    assert box.shape == (12, 4) and (box[:, 2:] > 0).all() and (box[:, :2] + box[:, 2:] <= 1 + 1e-6).all()
    flip = P.render_family(samples, "flip", cfg, 48, per_image=8, masks=("none",))["none"].theta
    assert set(flip.flatten().tolist()) == {0.0, 1.0}


def test_disc_mask_removes_the_corner_cue():
    # A flat grey-white image rotated with black fill: without the mask the corners' darkness grows
    # with |φ|; with it, x' is the same for every φ (nothing but the disc is left, and it is flat).
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(buf, "JPEG", quality=95)
    samples = [(buf.getvalue(), 0)]
    cfg = PathConfig(ref_size=48)
    plain = P.render_family(samples, "rotation", cfg, 48, 16, masks=("none",))["none"]
    corner_dark = 1 - plain.x2.float()[:, :, :6, :6].mean((1, 2, 3))
    assert torch.corrcoef(torch.stack([corner_dark, plain.theta[:, 0].abs()]))[0, 1] > 0.8
    masked = P.render_family(samples, "rotation", cfg, 48, 16, masks=("disc",))["disc"]
    inside = P.disc_mask(48)
    assert (masked.x2.float()[:, :, ~inside] == P.MASK_FILL).all()
    # bilinear blending at the disc's rim leaves a thin ring; the rest of the disc does not depend on φ
    c = torch.arange(48) + 0.5 - 24
    core = c[:, None] ** 2 + c[None, :] ** 2 < 22**2
    assert (masked.x2.float()[:, :, core].std(0) < 0.02).all()


def test_symmetric_images_are_dropped_by_a_measured_test():
    chess = ((np.arange(64)[:, None] // 8 + np.arange(64)[None] // 8) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(chess).convert("RGB").save(buf, "JPEG", quality=95)
    samples = _blob_jpegs(3) + [(buf.getvalue(), 0)]
    kept, dropped = P.drop_symmetric(samples, 64)
    assert dropped == [3] and len(kept) == 3


def test_targets_per_family():
    theta = torch.tensor([[30.0], [-30.0]])
    assert torch.equal(P.targets("rotation", theta, "abs"), torch.tensor([[30.0], [30.0]]))
    sc = P.targets("rotation", theta, "sincos")
    assert torch.allclose(sc, torch.tensor([[0.5, 3**0.5 / 2], [-0.5, 3**0.5 / 2]]), atol=1e-6)
    assert torch.equal(P.targets("blur", theta, "sincos"), theta)  # sincos is rotation's only


@pytest.mark.slow
def test_pixel_baseline_on_the_demo_photos(demo_shards):
    """The pixel baseline under the default ridge readout, split by source photo, on the 8 demo photos:
    with the fill's corners visible (mask none) it reads rotation; on content alone (disc) 8 photos are
    too few for raw pixels (R² ≈ 0; the basis of probes.MIN_PHOTOS), and the record warns."""
    samples = probes.read_split(demo_shards, "train") + probes.read_split(demo_shards, "val")
    cfg = probes.ProbeConfig(transforms=("rotation",), size=64, baselines=())
    out = probes.equivariance({"pixels": probe_embed.PixelEmbedder()}, samples, cfg, CPU, quiet=True)
    none, disc = (out["results"]["rotation"][f"{m}/tokens"]["pixels"]["all"] for m in ("none", "disc"))
    assert none["r2"] > 0.25 and abs(disc["r2"]) < 0.1, (none, disc)
    assert out["pairs"]["photos"] == 8 and "only 8 source photos" in out["pairs"]["warning"]


# --- backbones from training checkpoints, the CLI and its results file -----------------------------


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A checkpoint as train/main.py writes it (model state + resolved config), of an untrained demo model."""
    cfg = load_config("demo")
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.data)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    state = {"format": checkpoint.FORMAT, "model": method.state_dict(), "config": to_dict(cfg), "step": 0}
    torch.save(
        {**state, "checksum": checkpoint.digest(state)},
        path,  # what checkpoint.save adds last
    )
    return path, method


def test_checkpoint_parts_match_the_encoder(demo_checkpoint):
    path, method = demo_checkpoint
    bb = backbones.load_backbone(path)
    emb = probe_embed.Embedder.from_backbone(bb)
    assert emb.parts == ("all", "inv", "eq") and bb.img_size == 64
    x = torch.rand(2, 3, 64, 64)
    out = emb(x)
    with torch.no_grad():
        split = method.encoder.eval()(probe_normalise(x, bb))
    # The probe's inv/eq features are exactly the encoder's pooled z_inv / z_eq.
    assert torch.allclose(out["inv"], split.z_inv, atol=1e-5)
    assert torch.allclose(out["eq"], split.z_eq_pooled, atol=1e-5)
    assert out["all"].shape == (2, method.encoder.embed_dim)


def probe_normalise(x, bb):
    mean, std = torch.tensor(bb.mean).view(1, 3, 1, 1), torch.tensor(bb.std).view(1, 3, 1, 1)
    return (x - mean) / std


def test_export_loads_like_its_checkpoint(demo_checkpoint, tmp_path):
    from train.export import export

    path, _ = demo_checkpoint
    x = torch.rand(2, 3, 64, 64)
    load = lambda p, pool="mean": probe_embed.Embedder.from_backbone(backbones.load_backbone(p), pool)
    want = load(path)(x)
    export(path, tmp_path / "backbone")  # a timm local-dir folder with the split head beside the weights
    assert backbones.load_backbone(tmp_path / "backbone").img_size == 64
    plain = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True).eval()
    with torch.no_grad():  # what a timm user gets: the pooled features the probe reads as "all"
        assert torch.allclose(
            plain(probe_normalise(x, backbones.load_backbone(path))), want["all"], atol=1e-5
        )
    headed = load(tmp_path / "backbone")
    assert headed.parts == ("all", "inv", "eq")
    got = headed(x)
    assert all(torch.allclose(got[p], want[p], atol=1e-5) for p in ("all", "inv", "eq"))
    # the other poolings: grid2 = four quadrant means, tokens = every patch token
    grid, tokens = load(path, "grid2")(x), load(path, "tokens")(x)
    assert grid["all"].shape == (2, 4 * 192) and tokens["eq"].shape == (2, 64 * (want["eq"].shape[1]))
    assert torch.allclose(grid["all"].reshape(2, 4, -1).mean(1), want["all"], atol=1e-5)
    # the random twin: same architecture and split, other weights
    twin = probe_embed.random_twin(headed)
    assert twin.parts == headed.parts and not torch.allclose(twin(x)["all"], got["all"])


def test_bad_backbone_files_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="missing.pt"):
        backbones.load_backbone(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable training checkpoint"):
        backbones.load_backbone(junk)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an eqrecon training checkpoint"):
        backbones.load_backbone(tmp_path / "other.pt")


@pytest.mark.slow
def test_cli_writes_results_json(demo_checkpoint, demo_shards, tmp_path, capsys):
    path, _ = demo_checkpoint
    out = tmp_path / "eq.json"
    fast = ["--quiet"]
    eq = ["equivariance", "--backbone", str(path), "--data", str(demo_shards), "--split", "val"]
    argv = [*eq, "--transforms", "rotation,crop", "--samples", "2", "--part", "all,inv,eq", "--out", str(out)]
    assert probe.main([*argv, *fast]) == 0
    record = json.loads(out.read_text())
    assert record["what"] == "probe-equivariance" and record["pairs"]["images"] == 16
    assert record["pairs"]["photos"] == 8 and record["pairs"]["per_family"] == 32
    # default: masks disc and none for rotation (crop is never masked), pools tokens and grid2
    assert {f: list(r) for f, r in record["results"].items()} == {
        "rotation": ["disc/tokens", "disc/grid2", "none/tokens", "none/grid2"],
        "crop": ["none/tokens", "none/grid2"],
    }
    for by_setting in record["results"].values():
        for by_model in by_setting.values():
            assert set(by_model) == {"backbone", "random", "pixels"} and set(by_model["pixels"]) == {"all"}
            assert set(by_model["backbone"]) == {"all", "inv", "eq"}
            for r in by_model["backbone"].values():
                assert r["r2"] <= 1 and len(r["r2_assignments"]) == 4 and r["n"] == 32
                assert r["vs"]["random"]["of"] == 4
    printed = capsys.readouterr().out  # the table, with its photo count, pair rule and sanity rows
    assert "source photos: 8 (16 images" in printed and "16 images x 2 pairs (--samples)" in printed
    assert "random" in printed and "pixels" in printed and "- random" in printed
    assert "images/s" in printed and "warning: only 8 source photos" in printed

    out = tmp_path / "lin.json"
    lin = ["linear", "--backbone", str(path), "--data", str(demo_shards), "--part", "all,eq"]
    assert probe.main([*lin, "--out", str(out), *fast]) == 0
    record = json.loads(out.read_text())
    assert record["what"] == "probe-linear" and set(record["results"]) == {"all", "eq"}
    for r in record["results"].values():
        assert (
            0 <= r["linear_top1"] <= 1 and 0 <= r["knn_top1"] <= 1 and (r["n_train"], r["n_val"]) == (64, 16)
        )

    assert probe.main(["equivariance", "--backbone", str(path), "--data", str(tmp_path), *fast]) == 2
    assert "no val-*.tar shards" in capsys.readouterr().err


def _one_error_line(capsys, words: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not err.startswith("error: error:"), err
    assert err.count("\n") == 1 and words in err, err


def test_linear_probe_on_unlabeled_shards_is_one_line(demo_shards, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(demo_shards, folder)
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(meta | {"labeled": False}))
    argv = ["linear", "--backbone", "timm:test_vit", "--data", str(folder), "--quiet"]
    assert probe.main(argv) == 2
    _one_error_line(capsys, "--labels folders")


@pytest.mark.integration
def test_damaged_exports_and_checkpoints_are_one_line(trained, tmp_path, capsys):
    """issue 22 item 9: the loaders raise ExportError / CheckpointError, which the CLI catches (UserError)."""
    _, folder = trained
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:500])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for spec, words in ((cut, "damaged export file"), (junk, "not a readable training checkpoint")):
        assert probe.main(["equivariance", "--backbone", str(spec), "--quiet"]) == 2
        _one_error_line(capsys, words)


@pytest.mark.integration
def test_a_foreign_weights_file_in_an_export_is_one_line(trained, tmp_path, capsys):
    """issue 22 item 7: a model.safetensors of another patch size (timm would resample it silently)."""
    from safetensors.torch import save_file

    _, folder = trained
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    other = timm.create_model(cfg["architecture"], **(cfg["model_args"] | {"patch_size": 16}))
    save_file(other.state_dict(), str(foreign / "model.safetensors"))
    with pytest.raises(
        UserError, match="is .* but config.json .* needs .* these weights belong to another model"
    ):
        backbones.load_backbone(foreign)
    assert probe.main(["equivariance", "--backbone", str(foreign), "--quiet"]) == 2
    _one_error_line(capsys, "belong to another model")


@pytest.mark.integration
def test_img_size_reaches_the_backbone_loader(trained, demo_shards, tmp_path):
    """issue 22 item 10: --img-size 72 on a 32-px export resamples the position embedding (9x9 tokens:
    grid2 needs an even grid, so the default pools keep tokens and say why)."""
    _, folder = trained
    out = tmp_path / "eq.json"
    argv = ["equivariance", "--backbone", str(folder), "--data", str(demo_shards), "--img-size", "72"]
    argv += ["--transforms", "translation", "--samples", "2", "--no-baselines", "--quiet", "--out", str(out)]
    assert probe.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["config"]["img_size"] == 72 and list(record["results"]["translation"]) == [
        "disc/tokens",
        "none/tokens",
    ]
    assert "pool grid2 skipped" in record["notes"][0]


def test_read_split_reads_the_shards_dataset_json_lists(demo_shards, tmp_path):
    """A stray tar beside the shards (an old copy, a partial download) is not read twice."""
    folder = tmp_path / "shards"
    shutil.copytree(demo_shards, folder)
    shutil.copy(folder / "val-000000.tar", folder / "val-000007.tar")
    samples = probes.read_split(folder, "val")
    assert len(samples) == json.loads((folder / "dataset.json").read_text())["splits"]["val"]["count"]
    assert len({jpg for jpg, _ in samples}) == len(samples)
    (folder / "val-000001.tar").write_bytes((folder / "val-000001.tar").read_bytes()[:3000])
    with pytest.raises(ProbeError, match="val-000001.tar"):
        probes.read_split(folder, "val")
