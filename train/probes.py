"""The probes as functions (the CLI is train/probe.py): `ProbeConfig`, `equivariance(...)` (pairs
rendered by pipeline/pairs.py, embedded once each, read out by ridge or an MLP) and `linear(...)`
(linear and k-NN top-1 on labelled shards), with the data helpers they share.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.encoder import PROBE_POOLS
from pipeline.errors import DataError, ProbeError
from pipeline.oracle import decode
from pipeline.pairs import (
    MASKS,
    SYMMETRY_THRESHOLD,
    TARGETS,
    TRANSFORMS,
    anchor_key,
    anchor_view,
    drop_symmetric,
    masks_for,
    render_family,
    targets,
)
from pipeline.path import PathConfig
from pipeline.shards import parse_label, read_shard, split_shards
from train.backbones import Backbone, load_backbone
from train.probe_embed import Embedder, PixelEmbedder, embed, embed_pools, random_twin
from train.probe_fit import PROTOCOLS, knn_top1, linear_top1, over_seeds
from train.probe_ridge import paired, ridge_cv

BASELINES = ("random", "pixels")
READOUTS = ("ridge", *PROTOCOLS)  # ridge (train/probe_ridge.py), or an MLP protocol of train/probe_fit.py
RIDGE_TRAIN_PAIRS = 300  # per family and mask: a closed form has ~F·T unknowns, needs no epochs of data
MLP_TRAIN_PAIRS = 5000  # per family: what an MLP head needed to fit (the protocol before the ridge)
# The fewest source photos at which the raw-pixel baseline has been seen to read rotation under the
# disc mask (ridge, 19 photos: R² 0.28 in issue 19's run, 0.17 ± 0.20 in bench/results/science-cpu.json,
# both with 7,735 pairs; 0.03 ± 0.11 from 1,190 pairs of the same photos); on the 8 demo photos it reads
# ≈ 0 (test_pixel_baseline_on_the_demo_photos). Below it, a low R² may be the photo count, not the features.
MIN_PHOTOS = 19


@dataclass
class ProbeConfig:
    """Everything the equivariance probe is run with (the CLI's flags, bench/science's settings)."""

    transforms: tuple[str, ...] = TRANSFORMS
    size: int = 64  # probe resolution (the CLI: the backbone's training resolution)
    min_train_pairs: int = 0  # per family and mask; 0 = the readout's need (RIDGE_/MLP_TRAIN_PAIRS)
    per_image: int = 0  # pairs per image; 0 = sized from min_train_pairs
    seeds: tuple[int, ...] = (0, 1, 2)  # MLP probe seeds: held-out photos, head init, minibatch order
    pair_seed: int = 0  # the rendered pairs (θ) and the ridge's fold assignments
    target: str = "signed"  # signed | abs | sincos (pipeline.pairs.targets)
    pool: str = "tokens,grid2"  # comma list of mean | cls | grid2 | tokens (model.encoder.pool_tokens)
    mask: str = "disc,none"  # comma list: disc = grey outside the central disc (no corner cue) | none
    protocol: str = "ridge"  # ridge | fast | sie (READOUTS)
    folds: int = 4  # ridge: K-fold CV over source photos (each tested once), nested CV for α
    assignments: int = 4  # ridge: random fold assignments; their spread is the table's ±
    hidden: int = 0  # MLP width; 0 = the protocol's
    epochs: int = 0  # MLP training epochs; 0 = the protocol's
    test_fraction: float = 0.25  # MLP: of the source photos, held out for scoring
    group_by: str = "photo"  # photo: hold out whole source photos; image: single crops (leaks content)
    symmetry_threshold: float = SYMMETRY_THRESHOLD  # images more 90°-symmetric than this are dropped
    baselines: tuple[str, ...] = BASELINES
    batch_size: int = 256
    aug: PathConfig = field(default_factory=PathConfig)  # the protocol's θ ranges

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(p for p in self.pool.split(",") if p)

    @property
    def masks(self) -> tuple[str, ...]:
        return tuple(m for m in self.mask.split(",") if m)

    def check(self) -> None:
        for name, values, allowed in (
            ("pool", self.pools, PROBE_POOLS),
            ("target", (self.target,), TARGETS),
            ("mask", self.masks, MASKS),
            ("protocol", (self.protocol,), READOUTS),
        ):
            bad = [v for v in values if v not in allowed] if values else [""]
            if bad:
                raise ProbeError(f"--{name} {bad[0]!r}: choose from {', '.join(allowed)}")
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ProbeError(f"unknown transformation {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
        if self.group_by not in ("photo", "image"):
            raise ProbeError(f"--group-by {self.group_by!r}: choose from photo, image")
        if self.protocol != "ridge" and not self.seeds:
            raise ProbeError("--seeds: give at least one probe seed")
        if self.protocol == "ridge" and (self.folds < 3 or self.assignments < 1):
            raise ProbeError("--folds must be at least 3 and --assignments at least 1")

    def fit(self):
        fit = PROTOCOLS[self.protocol]
        return replace(fit, hidden=self.hidden or fit.hidden, epochs=self.epochs or fit.epochs)

    def train_share(self) -> float:
        """The share of the pairs a fit trains on: (K-1)/K for ridge; for the MLP 1 - test_fraction, less
        a margin for photos of unequal size."""
        return (self.folds - 1) / self.folds if self.protocol == "ridge" else 0.95 - self.test_fraction

    def pairs_per_image(self, n_images: int) -> int:
        """Enough pairs per image that a fit trains on min_train_pairs (the readout's need when 0)."""
        need = self.min_train_pairs or (RIDGE_TRAIN_PAIRS if self.protocol == "ridge" else MLP_TRAIN_PAIRS)
        return self.per_image or max(2, math.ceil(need / max(1e-9, n_images * self.train_share())))

    def pair_rule(self, n_images: int) -> str:
        """The pair-count rule's outcome, in words (printed above the table)."""
        per = self.pairs_per_image(n_images)
        if self.per_image:
            return f"{n_images} images x {per} pairs (--samples)"
        need = self.min_train_pairs or (RIDGE_TRAIN_PAIRS if self.protocol == "ridge" else MLP_TRAIN_PAIRS)
        why = "--pairs" if self.min_train_pairs else f"what the {self.protocol} readout needs"
        return (
            f"{n_images} images x {per} = {n_images * per} pairs per family and mask, so that each fit "
            f"trains on >= {need} ({why}; {self.train_share():.0%} of the pairs train)"
        )


# ------------------------------------------------------------------------------------------------ data


def read_split(data: str | Path, split: str, limit: int = 0) -> list[tuple[bytes, int]]:
    """(JPEG bytes, class index) of every sample in the split's shards (dataset.json's list), in shard
    order; `limit` > 0 keeps the first `limit` samples (shards are shuffled when written, so this is a
    random subset). Shards are read and checked by the reference pipeline's reader."""
    folder = Path(data)
    if not (folder / "dataset.json").is_file():
        raise ProbeError(
            f"{folder}: no {split}-*.tar shards (no dataset.json); "
            "convert a dataset with `python -m pipeline.convert`"
        )
    samples: list[tuple[bytes, int]] = []
    try:
        for shard in split_shards(folder, split):
            for sample in read_shard(shard.path, shard.count):
                if "jpg" not in sample:
                    raise ProbeError(f"{shard.path}: sample {sample['__key__']!r} has no .jpg")
                where = f"{shard.path}: {sample['__key__']}"
                label = parse_label(sample["cls"], where) if "cls" in sample else -1
                samples.append((sample["jpg"], label))
                if limit and len(samples) >= limit:
                    return samples
    except (DataError, FileNotFoundError) as err:
        raise ProbeError(str(err)) from None
    return samples


def source_groups(samples: list[tuple[bytes, int]]) -> list[int]:
    """The source photo of each sample, the probe's split unit: its label when every sample has one
    (the demo photos and bench/science's crops are labelled by source photo; for a class-labelled set
    this holds out whole classes, stricter still), else each image on its own."""
    if samples and all(label >= 0 for _, label in samples):
        return [label for _, label in samples]
    return list(range(len(samples)))


# ------------------------------------------------------------------------------------------ drivers


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(threads: int, device: torch.device, fill_cores: bool = True) -> int:
    """Size torch's CPU pool like the trainer (train.loop.set_cpu_threads): an explicit count or
    OMP_NUM_THREADS wins; else one thread per core this process may use (the probe has no workers).
    fill_cores=False leaves a count of 0 at torch's default (the dense probe's `--threads 0`)."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif fill_cores and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def open_backbone(
    spec: str, img_size: int = 0, device: str = "auto", threads: int = 0, fill_cores: bool = True
) -> tuple[Backbone, torch.device, int]:
    """The probe CLIs' setup (train/probe.py, train/probe_dense.py): `--backbone` loaded on the CPU at
    `--img-size` (0: its training resolution), the device `--device` names, and torch's CPU threads
    (`set_threads`) -> (backbone, device, threads)."""
    bb = load_backbone(spec, "cpu", img_size or None)
    dev = pick_device(device)
    return bb, dev, set_threads(threads, dev, fill_cores)


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False, dynamic_ncols=True)


def embedders_for(emb: Embedder, baselines: tuple[str, ...], seed: int = 0) -> dict[str, nn.Module]:
    """{"backbone": emb, "random": its random-init twin, "pixels": raw pixels}, the baselines asked for."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ProbeError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    out: dict[str, nn.Module] = {"backbone": emb}
    if "random" in baselines:
        out["random"] = random_twin(emb, seed)
    if "pixels" in baselines:
        out["pixels"] = PixelEmbedder()
    return out


def grouping(samples: list[tuple[bytes, int]], group_by: str) -> tuple[list[int], str]:
    """The split unit of every sample and how it was chosen, in words (the table's header says it)."""
    if group_by == "image":
        return list(
            range(len(samples))
        ), "by image (--group-by image: crops of one photo may sit on both sides)"
    if samples and all(label >= 0 for _, label in samples):
        return source_groups(samples), "by source photo (the sample's label)"
    return list(range(len(samples))), "by image (unlabeled shards: one group per image)"


def _readout(
    f1: torch.Tensor,
    f2: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    cfg: ProbeConfig,
    device: torch.device,
):
    """R² of y from the pair [f1, f2] (N, 2D) by the configured readout (the ridge fitted on `device`)."""
    if cfg.protocol == "ridge":
        x = torch.cat([f1, f2], dim=1)
        return ridge_cv(x, y, groups, cfg.folds, cfg.assignments, seed=cfg.pair_seed, device=device)
    return over_seeds(f1, f2, y, groups, cfg.fit(), cfg.seeds, cfg.test_fraction)


def pool_free(model: nn.Module) -> bool:
    """Whether a model's features do not depend on the pooling (pixels, a plain {part: (B, D)} module)."""
    return getattr(model, "pool_free", not hasattr(model, "pooled"))


def _pair_up(by_model: dict, reference: str) -> None:
    """Add each model's paired difference against `reference` (same folds / seeds), part by part."""
    for name, by_part in by_model.items():
        if name == reference or name in BASELINES:
            continue
        for part, r in by_part.items():
            if part in by_model[reference]:
                r.setdefault("vs", {})[reference] = paired(r, by_model[reference][part])


def equivariance(
    models: dict[str, nn.Module],
    samples: list[tuple[bytes, int]],
    cfg: ProbeConfig,
    device: torch.device | None = None,
    quiet: bool = False,
) -> dict:
    """The equivariance probe -> {"pairs": {...}, "speed": {...}, "results": {family: {"MASK/POOL":
    {model: {part: readout}}}}}.

    models map (B, 3, S, S) images in [0, 1] to {pool: {part: (B, D)}} through `.pooled(x, pools)`
    (Embedder, PixelEmbedder). Each family's pairs are rendered once (g once for every mask) and every
    rendering is embedded once per model, in one forward pass for every pooling; the anchor views
    shared by several families (pipeline.pairs.anchor_key) are embedded once. A readout is ridge_cv's
    or over_seeds' dict; models other than the first and `random` carry "vs": {reference: paired}.
    """
    cfg.check()
    device = device or pick_device()
    start = time.perf_counter()
    for model in models.values():
        if hasattr(model, "check_pools"):
            model.check_pools(cfg.pools)
    samples, dropped = drop_symmetric(samples, cfg.size, cfg.symmetry_threshold)
    groups, grouped = grouping(samples, cfg.group_by)
    need = cfg.folds if cfg.protocol == "ridge" else 3
    if len(set(groups)) < need:
        raise ProbeError(
            f"the equivariance probe needs images from at least {need} source photos, got "
            f"{len(set(groups))} (after dropping {len(dropped)} 90°-symmetric images)"
        )
    per_image = cfg.pairs_per_image(len(samples))
    models = {name: m.to(device).eval() for name, m in models.items()}
    plan = {family: masks_for(family, cfg.masks) for family in cfg.transforms}
    keys = {anchor_key(f, m) for f, ms in plan.items() for m in ms}
    n_render = len(keys) * len(samples) + sum(len(ms) for ms in plan.values()) * len(samples) * per_image
    bar = _progress(n_render * len(models), "embedding", quiet)
    anchors: dict[tuple[str, str], dict] = {}  # (model, anchor key) -> {pool: {part: (M, D)}}
    results: dict = {}
    embed_s, fit_s, embedded = 0.0, 0.0, 0
    references = [r for r in dict.fromkeys(("random", next(iter(models)))) if r in models]
    for family, masks in plan.items():
        rendered = render_family(
            samples, family, cfg.aug, cfg.size, per_image, groups, cfg.pair_seed, masks, device
        )
        results[family] = {}
        for mask, pairs in rendered.items():
            y = targets(family, pairs.theta, cfg.target)
            feats = {}
            for name, model in models.items():
                t0 = time.perf_counter()
                key = (name, anchor_key(family, mask))
                if key not in anchors:
                    anchors[key] = embed_pools(model, pairs.x1, cfg.pools, cfg.batch_size, device, bar)
                    embedded += len(pairs.x1)
                feats[name] = (
                    anchors[key],
                    embed_pools(model, pairs.x2, cfg.pools, cfg.batch_size, device, bar),
                )
                embedded += len(pairs.x2)
                embed_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            once: dict = {}  # pool-free models (pixels): one fit, the same row under every pooling
            for pool in cfg.pools:
                by_model: dict = {}
                for name, (f1, f2) in feats.items():
                    if pool_free(models[name]) and name in once:
                        by_model[name] = copy.deepcopy(once[name])
                        continue
                    by_model[name] = {}
                    for part, x2 in f2[pool].items():
                        x1 = f1[pool][part][pairs.anchor]
                        if not (x1.isfinite().all() and x2.isfinite().all()):
                            raise ProbeError(
                                f"{name} gave non-finite features (part {part}) on the {family} pairs"
                            )
                        by_model[name][part] = _readout(x1, x2, y, pairs.groups, cfg, device)
                    once[name] = copy.deepcopy(by_model[name])
                for reference in references:
                    _pair_up(by_model, reference)
                results[family][f"{mask}/{pool}"] = by_model
            fit_s += time.perf_counter() - t0
    bar.close()
    total = time.perf_counter() - start
    photos = len(set(groups))
    return {
        "pairs": {
            "images": len(samples),
            "photos": photos,
            "grouping": grouped,
            "per_image": per_image,
            "per_family": len(samples) * per_image,
            "rule": cfg.pair_rule(len(samples)),
            "dropped_symmetric": len(dropped),
            "readout": cfg.protocol,
            "warning": (
                f"only {photos} source photos: the pixel baseline has shown power from {MIN_PHOTOS} on; "
                "with fewer a low R² may say more about the photo count than the features"
            )
            if photos < MIN_PHOTOS
            else "",
        },
        "speed": {
            "images_embedded": embedded,
            "embed_s": round(embed_s, 2),
            "images_per_s": round(embedded / max(embed_s, 1e-9), 1),
            "fit_s": round(fit_s, 2),
            "total_s": round(total, 2),
        },
        "results": results,
    }


def linear(
    model: nn.Module,
    train: list[tuple[bytes, int]],
    val: list[tuple[bytes, int]],
    size: int,
    device: torch.device | None = None,
    batch_size: int = 256,
    k: int = 20,
    quiet: bool = False,
) -> dict:
    """Linear-probe and k-NN top-1 -> {part: {"linear_top1", "knn_top1", "n_train", "n_val"}}."""
    device = device or pick_device()
    model = model.to(device).eval()
    for name, split in (("train", train), ("val", val)):
        if not split:
            raise ProbeError(
                f"the {name} split is empty; the linear probe needs labelled train and val shards"
            )
        if any(label < 0 for _, label in split):
            raise ProbeError(
                f"the {name} split has unlabelled samples (cls -1); the linear probe needs labels"
            )
    bar = _progress(len(train) + len(val), "embedding", quiet)
    feats = []
    for split in (train, val):
        # The centre view (largest centred square) is the usual "resize + centre crop" evaluation view.
        views = torch.stack(
            [anchor_view(decode(jpg, key=f"#{i}"), "centre", size) for i, (jpg, _) in enumerate(split)]
        )
        with torch.no_grad():
            feats.append(embed(model, views, batch_size, device, bar))
    bar.close()
    (f_tr, f_va), y_tr, y_va = feats, torch.tensor([y for _, y in train]), torch.tensor([y for _, y in val])
    return {
        part: {
            "linear_top1": linear_top1(f_tr[part], y_tr, f_va[part], y_va),
            "knn_top1": knn_top1(f_tr[part], y_tr, f_va[part], y_va, k=k),
            "n_train": len(y_tr),
            "n_val": len(y_va),
        }
        for part in f_tr
    }
