"""Frozen-backbone probes: how much transformation information the features keep, and how invariant they are.

    python train/probe.py equivariance --backbone RUN/backbone [--data SHARDS] [--split val]
        [--pool tokens,grid2] [--mask disc,none] [--protocol ridge|fast|sie] [--folds 4] [--assignments 4]
        [--target signed|abs|sincos] [--pairs N] [--transforms rotation,...] [--no-baselines] [--out r.json]
    python train/probe.py linear --backbone RUN/backbone --data LABELLED_SHARDS [--out results.json]

`--backbone` is a training checkpoint (RUN/ckpt/*.pt), a `train/export.py` export, or timm:NAME[:W].
Without `--data` the probes read the embedded demo photos.

Equivariance: for each transformation family alone, pairs (x, x') are rendered once by
`pipeline.pairs` (the leaks it removes and the target of each family are described there) and
embedded, each rendering once, by the backbone and, by default, by two sanity baselines on the same
pairs: `random` (the same architecture and head, random init) and `pixels` (the image at 16×16). The
default readout is closed-form ridge regression of the family's target from [f(x), f(x')] with
K-fold cross-validation over source photos (`train.probe_ridge`: every photo tested once, α by nested
CV), repeated over fold assignments; the backbone's paired difference to `random` on the same folds is
printed under it. `--protocol fast|sie` fits an MLP instead (`train.probe_fit`; sie = the papers'
protocol) on held-out photos, over `--seeds`. Both masks (disc: content only; none: the fill's corners
visible) and both pools (tokens, grid2) are reported by default. The pair count is sized from the data
and the readout (`ProbeConfig.pairs_per_image`, printed). A backbone is only informative where it
beats `random`; `pixels` shows what the pairs allow at all.

Invariance: a linear classifier (softmax regression on standardised features) fitted on the train
split and scored on the val split, and DINO's weighted k-NN (cosine, k = 20, T = 0.07) as a cheap check.
It needs labelled shards; on unlabeled ones it is one error line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # `python train/probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.encoder import PROBE_POOLS
from pipeline.errors import DataError, ProbeError, UserError, one_line
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
from pipeline.shards import dataset_is_labeled, load_meta, parse_label, read_shard, split_shards
from train import probe_dense
from train.probe_embed import PARTS, Embedder, PixelEmbedder, embed, embed_pools, load_backbone, random_twin
from train.probe_fit import PROTOCOLS, knn_top1, linear_top1, over_seeds
from train.probe_ridge import paired, ridge_cv

BASELINES = ("random", "pixels")
READOUTS = ("ridge", *PROTOCOLS)  # ridge (train/probe_ridge.py), or an MLP protocol of train/probe_fit.py
RIDGE_TRAIN_PAIRS = 300  # per family and mask: a closed form has ~F·T unknowns, needs no epochs of data
MLP_TRAIN_PAIRS = 5000  # per family: what an MLP head needed to fit (the protocol before the ridge)
# The fewest source photos at which the raw-pixel baseline has been seen to read rotation under the
# disc mask (ridge: R² 0.28 from 19 photos in issue 19's run); on the 8 demo photos it reads ≈ 0
# (test_pixel_baseline_on_the_demo_photos). Below it, a low R² may be the photo count, not the features.
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


def set_threads(threads: int, device: torch.device) -> int:
    """Size torch's CPU pool like the trainer (train.loop.set_cpu_threads): an explicit count or
    OMP_NUM_THREADS wins; else one thread per core this process may use (the probe has no workers)."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


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


def _readout(f1: torch.Tensor, f2: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, cfg: ProbeConfig):
    """R² of y from the pair [f1, f2] (N, 2D) by the configured readout."""
    if cfg.protocol == "ridge":
        x = torch.cat([f1, f2], dim=1)
        return ridge_cv(x, y, groups, cfg.folds, cfg.assignments, seed=cfg.pair_seed)
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
                        by_model[name][part] = _readout(x1, x2, y, pairs.groups, cfg)
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


# ------------------------------------------------------------------------------------------ the CLI


def format_equivariance(record: dict) -> str:
    """Rows = family × mask × model (then each backbone's paired differences), columns = pool × part;
    a cell is 'mean ± std' of R² over the fold assignments (ridge) or probe seeds (MLP); a difference
    cell adds in how many of them it was positive."""
    results = record["results"]
    settings = [s for fam in results.values() for s in fam]
    pools = list(dict.fromkeys(s.split("/")[1] for s in settings))
    parts = [
        p
        for p in PARTS
        if any(p in by_part for fam in results.values() for by in fam.values() for by_part in by.values())
    ]
    columns = [(pool, part) for pool in pools for part in parts]
    head = f"{'transformation':<15}{'mask':<6}{'features':<11}" + "".join(
        f"{f'{a}/{b}':>21}" for a, b in columns
    )
    lines = [head, "-" * len(head)]
    for family, by_setting in results.items():
        masks = list(dict.fromkeys(s.split("/")[0] for s in by_setting))
        for i, mask in enumerate(masks):
            names = list(by_setting[f"{mask}/{pools[0]}"])
            rows = [(name, name, None) for name in names]
            for name in names:
                for r in by_setting[f"{mask}/{pools[0]}"][name].values():
                    rows += [
                        (name, f"- {ref}", ref)
                        for ref in r.get("vs", {})
                        if (name, f"- {ref}", ref) not in rows
                    ]
            for j, (name, label, ref) in enumerate(rows):
                cells = ""
                for pool, part in columns:
                    r = by_setting.get(f"{mask}/{pool}", {}).get(name, {}).get(part)
                    if r is None or (ref and ref not in r.get("vs", {})):
                        cells += f"{'':>21}"
                    elif ref:
                        d = r["vs"][ref]
                        cells += f"{d['diff']:>+9.3f} ± {d['diff_std']:.3f} {d['positive']}/{d['of']}"
                    else:
                        cells += f"{r['r2']:>13.3f} ± {r['r2_std']:.3f}"
                first = i == 0 and j == 0
                lines.append(f"{family if first else '':<15}{mask if j == 0 else '':<6}{label:<11}{cells}")
    return "\n".join(lines)


def format_linear(results: dict) -> str:
    head = f"{'part':<6}{'linear top-1':>14}{'k-NN top-1':>12}"
    rows = [f"{p:<6}{r['linear_top1']:>14.3f}{r['knn_top1']:>12.3f}" for p, r in results.items()]
    return "\n".join([head, "-" * len(head), *rows])


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="train/probe.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backbone",
        required=True,
        help="export folder (train/export.py), training checkpoint (.pt), or timm:NAME[:WEIGHTS_FILE]",
    )
    common.add_argument(
        "--data", default="", help="shard folder (pipeline.convert); default: the demo photos"
    )
    common.add_argument(
        "--part",
        default="",
        help="comma list of all,inv,eq; default: all,eq for equivariance, every part for linear "
        "(those the backbone has)",
    )
    common.add_argument(
        "--pool",
        default="",
        help=f"{' | '.join(PROBE_POOLS)}; equivariance takes a comma list (default "
        f"{ProbeConfig.pool}), linear one (default mean)",
    )
    common.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    common.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: one per core, or OMP_NUM_THREADS)"
    )
    common.add_argument("--batch-size", type=int, default=256)
    common.add_argument("--img-size", type=int, default=0, help="probe resolution; default: the training one")
    common.add_argument("--out", default="", help="write the results as JSON here")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    eq = sub.add_parser("equivariance", parents=[common], help="R² of θ regressed from pair embeddings")
    eq.add_argument("--split", default="val", help="comma list of splits whose images make the pairs")
    eq.add_argument("--transforms", default=",".join(TRANSFORMS))
    eq.add_argument(
        "--pairs",
        type=int,
        default=0,
        help=f"train pairs per family and mask, at least (0: the readout's need: ridge {RIDGE_TRAIN_PAIRS}, "
        f"MLP {MLP_TRAIN_PAIRS})",
    )
    eq.add_argument("--samples", type=int, default=0, help="pairs per image (0: sized from --pairs)")
    eq.add_argument("--seeds", default="0,1,2", help="MLP probe seeds (comma list): mean ± std over them")
    eq.add_argument("--target", default="signed", choices=TARGETS, help="see pipeline/pairs.py")
    eq.add_argument(
        "--mask",
        default=ProbeConfig.mask,
        help=f"comma list of {', '.join(MASKS)}: grey outside the central disc (no corner cue) or not; "
        "rotation and translation are probed under each, colour and blur under the first",
    )
    eq.add_argument(
        "--protocol",
        default=ProbeConfig.protocol,
        choices=READOUTS,
        help="ridge: closed form, K-fold CV over source photos (train/probe_ridge.py); fast / sie: an MLP "
        "(train/probe_fit.py; sie = the papers' protocol)",
    )
    eq.add_argument("--folds", type=int, default=ProbeConfig.folds, help="ridge: folds over source photos")
    eq.add_argument(
        "--assignments", type=int, default=ProbeConfig.assignments, help="ridge: random fold assignments"
    )
    eq.add_argument("--hidden", type=int, default=0, help="MLP width (0: the protocol's)")
    eq.add_argument("--epochs", type=int, default=0, help="MLP epochs, early-stopped (0: the protocol's)")
    eq.add_argument(
        "--group-by",
        default="photo",
        choices=("photo", "image"),
        help="hold out whole source photos (default) or single images",
    )
    eq.add_argument("--no-baselines", action="store_true", help="skip the random-init and pixel baselines")
    eq.add_argument("--max-images", type=int, default=0, help="use at most this many images (0: all)")
    lin = sub.add_parser("linear", parents=[common], help="linear-probe and k-NN top-1")
    lin.add_argument("--train-split", default="train")
    lin.add_argument("--val-split", default="val")
    lin.add_argument("--max-train", type=int, default=0, help="at most this many train images (0: all)")
    lin.add_argument("--max-val", type=int, default=0, help="at most this many val images (0: all)")
    lin.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    probe_dense.add_parser(sub)  # `dense`: its own flags (train/probe_dense.py)
    return ap.parse_args(argv)


def _keep_parts(model: nn.Module, parts: tuple[str, ...]) -> nn.Module:
    """Restrict an Embedder's output to `parts` (all of them when empty)."""
    if not parts:
        return model
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ProbeError(f"--part {bad[0]!r}: choose from {', '.join(PARTS)}")
    missing = [p for p in parts if p not in model.parts]
    if missing:
        raise ProbeError(
            f"--part {missing[0]}: this backbone has only the parts {', '.join(model.parts)} "
            f"(inv/eq need the split head: a training checkpoint or an export with head)"
        )
    model.parts = tuple(p for p in model.parts if p in parts)
    return model


def run(args: argparse.Namespace) -> dict:
    """Run the probe `args` describes and return the results record (what --out writes)."""
    from pipeline.demo import ensure_demo_shards

    pools = args.pool or (ProbeConfig.pool if args.probe == "equivariance" else "mean")
    if args.probe != "equivariance" and "," in pools:
        raise ProbeError(f"--pool {pools}: the {args.probe} probe takes one pooling")
    bb = load_backbone(args.backbone, img_size=args.img_size or None)
    data_dir = Path(args.data) if args.data else ensure_demo_shards()
    device = pick_device(args.device)
    threads = set_threads(args.threads, device)
    emb = Embedder.from_backbone(bb, pools.split(",")[0])
    notes = []
    if not args.pool and args.probe == "equivariance":  # the defaults that apply to this backbone
        usable = []
        for pool in pools.split(","):
            try:
                emb.check_pools((pool,))
                usable.append(pool)
            except ProbeError as err:
                notes.append(f"pool {pool} skipped: {err}")
        pools = ",".join(usable)
    # equivariance: inv is what the SSL loss makes invariant; its rows cost time and say little
    default = tuple(p for p in ("all", "eq") if p in emb.parts) if args.probe == "equivariance" else ()
    emb = _keep_parts(emb, tuple(p for p in args.part.split(",") if p) or default)
    size = bb.img_size
    record = {
        "what": f"probe-{args.probe}",
        "backbone": bb.name,
        "data": str(data_dir),
        "threads": threads,
        "config": {k: v for k, v in vars(args).items() if k != "probe"} | {"img_size": size, "pool": pools},
        "notes": notes,
    }
    if args.probe == "equivariance":
        samples = [s for split in args.split.split(",") for s in read_split(data_dir, split)]
        if args.max_images:
            samples = samples[: args.max_images]
        cfg = ProbeConfig(
            transforms=tuple(t for t in args.transforms.split(",") if t),
            size=size,
            min_train_pairs=args.pairs,
            per_image=args.samples,
            seeds=_ints(args.seeds),
            target=args.target,
            pool=pools,
            mask=args.mask,
            protocol=args.protocol,
            folds=args.folds,
            assignments=args.assignments,
            hidden=args.hidden,
            epochs=args.epochs,
            group_by=args.group_by,
            baselines=() if args.no_baselines else BASELINES,
            batch_size=args.batch_size,
        )
        cfg.check()
        record.update(equivariance(embedders_for(emb, cfg.baselines), samples, cfg, device, args.quiet))
    else:
        if not dataset_is_labeled(load_meta(data_dir)):
            raise ProbeError(
                f"{data_dir}: unlabeled shards (dataset.json says labeled: false); the {args.probe} probe "
                "needs class labels: convert a folder of class folders with `python -m pipeline.convert "
                "--src FOLDER --out SHARDS --labels folders`"
            )
        train = read_split(data_dir, args.train_split, args.max_train)
        val = read_split(data_dir, args.val_split, args.max_val)
        record.update(results=linear(emb, train, val, size, device, args.batch_size, args.k, args.quiet))
    return record


def describe_pairs(record: dict) -> str:
    """The lines above the equivariance table: the data, the pair rule's outcome, the readout."""
    p, cfg = record["pairs"], record["config"]
    sp = record["speed"]
    if p["readout"] == "ridge":
        how = (
            f"ridge readout, {cfg['folds']}-fold CV over the groups (each tested once, α by nested CV), "
            f"R² mean ± std over {cfg['assignments']} fold assignments"
        )
    else:
        how = f"{p['readout']} MLP readout, R² mean ± std over {len(_ints(cfg['seeds']))} probe seeds"
    lines = [
        (
            f"source photos: {p['photos']} ({p['images']} images, split {p['grouping']}; "
            f"{p['dropped_symmetric']} 90°-symmetric images dropped)"
        ),
        f"pairs: {p['rule']}",
        f"{cfg['img_size']} px, target {cfg['target']}; {how}",
        (
            f"embedded {sp['images_embedded']} images at {sp['images_per_s']} images/s ({sp['embed_s']} s); "
            f"readouts {sp['fit_s']} s; total {sp['total_s']} s"
        ),
    ]
    lines += [f"note: {n}" for n in record.get("notes", [])]
    if p["warning"]:
        lines.append(f"warning: {p['warning']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.probe == "dense":
        return probe_dense.main(args)
    try:
        record = run(args)
    except UserError as err:  # the hierarchy's root, as train/main.py: export, checkpoint, data, probe
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"{record['what']}: {record['backbone']}")
    if args.probe == "equivariance":
        print(describe_pairs(record))
        print(format_equivariance(record))
        print(
            "R² near 1: θ can be read from the pair's features; near 0: the features ignore it. A backbone "
            "says something only where it beats `random` (same architecture, untrained; '- random' = the "
            "paired difference, positive in k of n assignments); `pixels` = the 16x16 image. all = backbone "
            "tokens, inv/eq = the split head's parts; mask disc hides the fill's corners (content only)."
        )
    else:
        print(format_linear(record["results"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
