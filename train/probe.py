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
import json
import sys
from pathlib import Path

from torch import nn

if __package__ in (None, ""):  # `python train/probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.encoder import PROBE_POOLS
from pipeline.errors import ProbeError, UserError, one_line
from pipeline.pairs import (
    MASKS,
    TARGETS,
    TRANSFORMS,
)
from pipeline.shards import dataset_is_labeled, load_meta
from train import probe_dense
from train.probe_embed import PARTS, Embedder
from train.probes import (
    BASELINES,
    MLP_TRAIN_PAIRS,
    READOUTS,
    RIDGE_TRAIN_PAIRS,
    ProbeConfig,
    embedders_for,
    equivariance,
    linear,
    open_backbone,
    read_split,
)

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
    bb, device, threads = open_backbone(args.backbone, args.img_size, args.device, args.threads)
    data_dir = Path(args.data) if args.data else ensure_demo_shards()
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
        print(one_line(err), file=sys.stderr)
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
