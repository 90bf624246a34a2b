"""Frozen-backbone probes: how much transformation information the features keep, and how invariant they are.

    python train/probe.py equivariance --backbone RUN/backbone.safetensors [--data SHARDS] [--split val]
        [--pool mean|cls|grid2|tokens] [--target signed|abs|sincos] [--protocol fast|sie]
        [--seeds 0,1,2] [--pairs 5000] [--transforms rotation,...] [--no-baselines] [--out results.json]
    python train/probe.py linear --backbone backbone.safetensors --data SHARDS [--out results.json]

`--backbone` is a training checkpoint (RUN/ckpt/*.pt) or a `train/export.py` export. Without `--data`
the probes read the embedded demo photos.

Equivariance: for each transformation family alone, pairs (x, x') are rendered once by
`pipeline.pairs` (the leaks it removes and the target of each family are described there) and
embedded by the backbone and, by default, by two sanity baselines on the same pairs: `random` (the
same architecture and head, random init) and `pixels` (the image itself at 16×16). An MLP regresses
the family's target from [f(x), f(x')] (`train.probe_fit`: the fast protocol, or SIE's with
`--protocol sie`); R² is measured on held-out source photos, mean ± std over `--seeds` probe seeds.
A backbone is only informative where it beats `random`; `pixels` shows what the pairs allow at all.

Invariance: a linear classifier (softmax regression on standardised features) fitted on the train
split and scored on the val split, and DINO's weighted k-NN (cosine, k = 20, T = 0.07) as a cheap check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # `python train/probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.encoder import PROBE_POOLS
from pipeline.errors import DataError, ProbeError, one_line
from pipeline.pairs import (
    MASKS,
    SYMMETRY_THRESHOLD,
    TARGETS,
    TRANSFORMS,
    anchor_view,
    drop_symmetric,
    render_pairs,
    targets,
)
from pipeline.path import PathConfig
from pipeline.reference import decode
from pipeline.shards import parse_label, read_shard, split_shards
from train.probe_embed import PARTS, Embedder, PixelEmbedder, embed, load_backbone, random_twin
from train.probe_fit import PROTOCOLS, knn_top1, linear_top1, over_seeds

BASELINES = ("random", "pixels")


@dataclass
class ProbeConfig:
    """Everything the equivariance probe is run with (the CLI's flags, bench/science's settings)."""

    transforms: tuple[str, ...] = TRANSFORMS
    size: int = 64  # probe resolution (the CLI: the backbone's training resolution)
    min_train_pairs: int = 5000  # per family; pairs per image are sized to reach it
    per_image: int = 0  # pairs per image; 0 = sized from min_train_pairs
    seeds: tuple[int, ...] = (0, 1, 2)  # probe seeds: held-out photos, head init, minibatch order
    pair_seed: int = 0  # the rendered pairs (θ): the same for every probe seed
    target: str = "signed"  # signed | abs | sincos (pipeline.pairs.targets)
    pool: str = "mean"  # mean | cls | grid2 | tokens (model.encoder.pool_tokens)
    mask: str = "disc"  # disc | none: grey outside the central disc (removes the fill's corner cue)
    protocol: str = "fast"  # fast | sie (train.probe_fit.PROTOCOLS)
    hidden: int = 0  # MLP width; 0 = the protocol's
    epochs: int = 0  # MLP training epochs; 0 = the protocol's
    test_fraction: float = 0.25  # of the source photos, held out for scoring
    group_by: str = "photo"  # photo: hold out whole source photos; image: single crops (leaks content)
    symmetry_threshold: float = SYMMETRY_THRESHOLD  # images more 90°-symmetric than this are dropped
    baselines: tuple[str, ...] = BASELINES
    batch_size: int = 256
    aug: PathConfig = field(default_factory=PathConfig)  # the protocol's θ ranges

    def check(self) -> None:
        for name, value, allowed in (
            ("pool", self.pool, PROBE_POOLS),
            ("target", self.target, TARGETS),
            ("mask", self.mask, MASKS),
            ("protocol", self.protocol, tuple(PROTOCOLS)),
        ):
            if value not in allowed:
                raise ProbeError(f"--{name} {value!r}: choose from {', '.join(allowed)}")
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ProbeError(f"unknown transformation {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
        if self.group_by not in ("photo", "image"):
            raise ProbeError(f"--group-by {self.group_by!r}: choose from photo, image")
        if not self.seeds:
            raise ProbeError("--seeds: give at least one probe seed")

    def fit(self):
        fit = PROTOCOLS[self.protocol]
        return replace(fit, hidden=self.hidden or fit.hidden, epochs=self.epochs or fit.epochs)

    def pairs_per_image(self, n_images: int) -> int:
        """Enough pairs per image that the train split (1 - test_fraction of the photos, less a margin
        for photos of unequal size) holds min_train_pairs."""
        return self.per_image or math.ceil(
            self.min_train_pairs / max(1, n_images * (0.95 - self.test_fraction))
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


def equivariance(
    models: dict[str, nn.Module],
    samples: list[tuple[bytes, int]],
    cfg: ProbeConfig,
    device: torch.device | None = None,
    quiet: bool = False,
) -> dict:
    """The equivariance probe -> {"pairs": {...}, "results": {family: {model: {part: over_seeds(...)}}}}.

    models map (B, 3, S, S) images in [0, 1] to {part: (B, D)} (Embedder, PixelEmbedder); each
    family's pairs are rendered once and embedded by every model.
    """
    cfg.check()
    device = device or pick_device()
    samples, dropped = drop_symmetric(samples, cfg.size, cfg.symmetry_threshold)
    groups = source_groups(samples) if cfg.group_by == "photo" else list(range(len(samples)))
    if len(set(groups)) < 3:
        raise ProbeError(
            f"the equivariance probe needs images from at least 3 source photos, got "
            f"{len(set(groups))} (after dropping {len(dropped)} 90°-symmetric images)"
        )
    per_image = cfg.pairs_per_image(len(samples))
    models = {name: m.to(device).eval() for name, m in models.items()}
    bar = _progress(len(cfg.transforms) * len(samples) * (per_image + 1) * len(models), "embedding", quiet)
    fit = cfg.fit()
    results: dict = {}
    for family in cfg.transforms:
        pairs = render_pairs(
            samples, family, cfg.aug, cfg.size, per_image, groups, cfg.pair_seed, cfg.mask, device
        )
        y = targets(family, pairs.theta, cfg.target)
        results[family] = {}
        for name, model in models.items():
            with torch.no_grad():
                f1, f2 = (embed(model, x, cfg.batch_size, device, bar) for x in (pairs.x1, pairs.x2))
            for part, feats in f2.items():
                if not (feats.isfinite().all() and f1[part].isfinite().all()):
                    raise ProbeError(f"{name} gave non-finite features (part {part}) on the {family} pairs")
            results[family][name] = {
                part: over_seeds(
                    f1[part][pairs.anchor], f2[part], y, pairs.groups, fit, cfg.seeds, cfg.test_fraction
                )
                for part in f2
            }
    bar.close()
    return {
        "pairs": {
            "images": len(samples),
            "photos": len(set(groups)),
            "per_image": per_image,
            "per_family": len(samples) * per_image,
            "dropped_symmetric": len(dropped),
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
    """Rows = family × model, columns = parts; each cell 'mean ± std' of r2 over the probe seeds."""
    results = record["results"]
    parts = [p for p in PARTS if any(p in by_part for fam in results.values() for by_part in fam.values())]
    head = f"{'transformation':<15}{'features':<10}" + "".join(f"{p:>17}" for p in parts)
    lines = [head, "-" * len(head)]
    for family, by_model in results.items():
        for name, by_part in by_model.items():
            cells = "".join(
                f"{by_part[p]['r2']:>9.3f} ± {by_part[p]['r2_std']:.3f}" if p in by_part else f"{'':>17}"
                for p in parts
            )
            lines.append(f"{family if name == 'backbone' else '':<15}{name:<10}{cells}")
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
        "--part", default="", help="comma list of all,inv,eq; default: every part the backbone has"
    )
    common.add_argument("--pool", default="mean", choices=PROBE_POOLS)
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
        "--pairs", type=int, default=ProbeConfig.min_train_pairs, help="train pairs per family (at least)"
    )
    eq.add_argument("--samples", type=int, default=0, help="pairs per image (0: sized from --pairs)")
    eq.add_argument("--seeds", default="0,1,2", help="probe seeds (comma list): mean ± std over them")
    eq.add_argument("--target", default="signed", choices=TARGETS, help="see pipeline/pairs.py")
    eq.add_argument("--mask", default="disc", choices=MASKS, help="grey outside the central disc (default)")
    eq.add_argument("--protocol", default="fast", choices=tuple(PROTOCOLS), help="see train/probe_fit.py")
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

    bb = load_backbone(args.backbone)
    data_dir = Path(args.data) if args.data else ensure_demo_shards()
    device = pick_device(args.device)
    threads = set_threads(args.threads, device)
    emb = _keep_parts(Embedder.from_backbone(bb, args.pool), tuple(p for p in args.part.split(",") if p))
    size = args.img_size or bb.img_size
    record = {
        "what": f"probe-{args.probe}",
        "backbone": bb.name,
        "data": str(data_dir),
        "threads": threads,
        "config": {k: v for k, v in vars(args).items() if k != "probe"} | {"img_size": size},
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
            pool=args.pool,
            mask=args.mask,
            protocol=args.protocol,
            hidden=args.hidden,
            epochs=args.epochs,
            group_by=args.group_by,
            baselines=() if args.no_baselines else BASELINES,
            batch_size=args.batch_size,
        )
        cfg.check()
        record.update(equivariance(embedders_for(emb, cfg.baselines), samples, cfg, device, args.quiet))
    else:
        train = read_split(data_dir, args.train_split, args.max_train)
        val = read_split(data_dir, args.val_split, args.max_val)
        record.update(results=linear(emb, train, val, size, device, args.batch_size, args.k, args.quiet))
    return record


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        record = run(args)
    except (ProbeError, DataError) as err:
        print(f"probe: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"{record['what']}: {record['backbone']}")
    if args.probe == "equivariance":
        p, first = record["pairs"], next(iter(next(iter(record["results"].values())).values()))
        seeds = len(_ints(args.seeds))
        print(
            f"pairs: {p['images']} images of {p['photos']} source photos x {p['per_image']} = {p['per_family']} "
            f"per family ({next(iter(first.values()))['n_train']} train / {next(iter(first.values()))['n_test']} "
            f"test for seed 0; split by source photo; {p['dropped_symmetric']} 90°-symmetric images dropped); "
            f"{record['config']['img_size']} px, mask {args.mask}, pool {args.pool}, target {args.target}, "
            f"protocol {args.protocol}; R² mean ± std over {seeds} probe seeds"
        )
        print(format_equivariance(record))
        print(
            "R² near 1: θ can be read from the pair's features; near 0: the features ignore it. A backbone "
            "says something only where it beats `random` (same architecture, untrained); `pixels` = the "
            "16x16 image. all = backbone tokens, inv/eq = the split head's parts."
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
