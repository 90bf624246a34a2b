"""Dense probes on frozen patch features: linear segmentation, linear depth, and patch retrieval.

    python train/probe.py dense --task seg|depth|retrieval --backbone B --data D [--layout auto|voc|...]
        [--img-size S] [--view slide|resize] [--stride N] [--layers 1|4] [--epochs 20] [--lr 1e-3]
        [--seeds 0,1,2] [--k 30] [--baselines random,pixels,constant] [--out results.json]

`--backbone` takes what the other probes take (train/backbones.py); `--data` a VOC 2012, ADE20K, NYU
Depth v2 or plain-layout folder (pipeline/dense_data.py). The views and the window rule are in
train/dense_views.py, the heads, retrieval and metrics in train/dense_fit.py, the table and picture in
train/dense_report.py. Every table has the backbone's random-init twin (train.probe_embed.random_twin)
on the same data and protocol; `pixels` (each patch's raw pixels) and `constant` (a chance floor) on
request. Linear heads: mean ± std over
`--seeds` (head init and minibatch order); retrieval has no randomness, so one run. The protocol is
printed above the table and stored in the JSON with provenance; `--out X.json` also writes X.png,
predictions beside the ground truth for `--show` val images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.dense_data import IGNORE, LAYOUTS, DenseSet, open_dense
from pipeline.errors import ProbeError, UserError, one_line
from train.dense_fit import (
    DEPTH_HEADS,
    SCHEDULES,
    HeadConfig,
    confusion,
    depth_metrics,
    depth_of,
    fit_head,
    knn_labels,
    patch_labels,
    seg_metrics,
)
from train.dense_report import format_table, picture
from train.dense_views import (
    VIEWS,
    Constant,
    DenseEncoder,
    Item,
    PatchPixels,
    assemble,
    embed_items,
    load_items,
)
from train.probe_embed import random_twin
from train.probes import open_backbone
from train.provenance import provenance

TASKS = ("seg", "depth", "retrieval")
BASELINES = ("random", "pixels", "constant")


def add_parser(sub) -> argparse.ArgumentParser:
    """The `dense` subcommand of train/probe.py."""
    p = sub.add_parser("dense", help="segmentation, depth and patch retrieval on frozen patch tokens")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument(
        "--backbone", required=True, help="export folder, training checkpoint, or timm:NAME[:WEIGHTS]"
    )
    p.add_argument("--data", required=True, help="VOC 2012, ADE20K, NYU Depth v2 or plain-layout folder")
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    p.add_argument("--img-size", type=int, default=0, help="window side S (default: the backbone's)")
    p.add_argument("--view", default="slide", choices=VIEWS, help="slide: short side S, S×S windows; resize")
    p.add_argument("--stride", type=int, default=0, help="window stride (0: S/2)")
    p.add_argument("--layers", type=int, default=1, help="last N blocks' patch tokens, concatenated")
    p.add_argument("--epochs", type=int, default=HeadConfig.epochs)
    p.add_argument("--lr", type=float, default=HeadConfig.lr)
    p.add_argument("--weight-decay", type=float, default=HeadConfig.weight_decay)
    p.add_argument("--head-batch", type=int, default=HeadConfig.batch, help="windows per head step")
    p.add_argument("--schedule", default=HeadConfig.schedule, choices=SCHEDULES)
    p.add_argument("--warmup", type=float, default=HeadConfig.warmup, help="fraction of steps warming up")
    p.add_argument("--depth-head", default=HeadConfig.depth_head, choices=DEPTH_HEADS)
    p.add_argument("--bins", type=int, default=HeadConfig.bins)
    p.add_argument("--min-depth", type=float, default=HeadConfig.min_depth, help="metres (valid range)")
    p.add_argument("--max-depth", type=float, default=HeadConfig.max_depth, help="metres (valid range)")
    p.add_argument("--k", type=int, default=30, help="retrieval: neighbours")
    p.add_argument("--temperature", type=float, default=0.02, help="retrieval: softmax temperature")
    p.add_argument("--chunk", type=int, default=4096, help="retrieval: query and bank rows per block")
    p.add_argument("--seeds", default="0,1,2", help="probe seeds (comma list): mean ± std over them")
    p.add_argument("--baselines", default="random", help=f"comma list of {', '.join(BASELINES)}, or none")
    p.add_argument("--max-train", type=int, default=0, help="at most this many train images (0: all)")
    p.add_argument("--max-val", type=int, default=0, help="at most this many val images (0: all)")
    p.add_argument("--show", type=int, default=4, help="val images in the picture")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="", help="write the results as JSON here (and the picture beside it)")
    p.add_argument("--quiet", action="store_true")
    return p


def head_config(args: argparse.Namespace) -> HeadConfig:
    return HeadConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch=args.head_batch,
        schedule=args.schedule,
        warmup=args.warmup,
        depth_head=args.depth_head,
        bins=args.bins,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
    )


# ------------------------------------------------------------------------------------------ protocol


def evaluate(
    model: nn.Module,
    task: str,
    ds: DenseSet,
    train: list[Item],
    val: list[Item],
    proto: dict,
    cfg: HeadConfig,
    device: torch.device,
    show: int = 0,
) -> tuple[list[dict], list[torch.Tensor]]:
    """One model on one task -> (metrics per probe seed, seed 0's predictions of the first `show` val
    images at their label's size: class maps or depth)."""
    size, patch = proto["img_size"], proto["patch"]
    f_train, f_val = (embed_items(model, items, size, device) for items in (train, val))
    x = torch.cat(f_train)  # (windows, D, g, g)
    y = torch.cat([item.window_labels(size) for item in train])  # (windows, S, S)
    if not (x.isfinite().all() and all(f.isfinite().all() for f in f_val)):
        raise ProbeError("non-finite features: the backbone's weights or its input statistics are broken")
    runs, shown = [], []
    if task == "retrieval":
        dist, has = patch_labels(y, patch, ds.num_classes)
        bank = x.float().permute(0, 2, 3, 1).reshape(len(dist), -1)[has]  # (patches, D)
        dist = dist[has]
        conf = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.long)
        for i, (item, f) in enumerate(zip(val, f_val)):
            q = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (windows·g·g, D)
            p = knn_labels(q, bank, dist, proto["k"], proto["temperature"], proto["chunk"], device)
            g = f.shape[-1]
            pred = assemble(p.reshape(len(f), g, g, -1).permute(0, 3, 1, 2), item, size).argmax(0)
            conf += confusion(pred, item.label, ds.num_classes)
            if i < show:
                shown.append(pred)
        return [seg_metrics(conf)], shown
    for seed in proto["seeds"]:
        out = ds.num_classes if task == "seg" else (1 if cfg.depth_head == "log" else cfg.bins)
        head = fit_head(x, y, task, out, cfg, seed, device)
        conf = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.long)
        per_image = []
        with torch.no_grad():
            for i, (item, f) in enumerate(zip(val, f_val)):
                o = head(f.to(device).float())
                if task == "seg":
                    pred = assemble(o.cpu(), item, size).argmax(0)
                    conf += confusion(pred, item.label, ds.num_classes)
                else:
                    pred = assemble(depth_of(o, cfg).cpu(), item, size)[0]
                    per_image.append(depth_metrics(pred, item.label, cfg))
                if i < show and seed == proto["seeds"][0]:
                    shown.append(pred)
        if task == "seg":
            runs.append(seg_metrics(conf))
        else:
            scored = [m for m in per_image if m is not None]
            if not scored:
                raise ProbeError(
                    f"no val depth inside the valid range [{cfg.min_depth}, {cfg.max_depth}] m; "
                    "check --min-depth/--max-depth against the data's units"
                )
            runs.append({k: statistics.fmean(m[k] for m in scored) for k in scored[0]})
    return runs, shown


def summarise(runs: list[dict]) -> dict:
    """Per-seed metrics -> {metric: mean, metric_std: population std, "per_seed": runs}."""
    out: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values)
    return out | {"per_seed": runs}


def models_for(enc: DenseEncoder, baselines: tuple[str, ...]) -> dict[str, nn.Module]:
    models: dict[str, nn.Module] = {"backbone": enc}
    if "random" in baselines:
        models["random"] = random_twin(enc, seed=0)
    if "pixels" in baselines:
        models["pixels"] = PatchPixels(enc.patch)
    if "constant" in baselines:
        models["constant"] = Constant(enc.patch)
    return models


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The dense probe `args` describes -> (the JSON record, what the picture needs: the predictions
    shown per model, their val items, the dataset)."""
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    baselines = () if args.baselines == "none" else tuple(b for b in args.baselines.split(",") if b)
    bad = [b for b in baselines if b not in BASELINES]
    if bad or not seeds:
        raise ProbeError(
            f"--baselines {bad[0]!r}: choose from {', '.join(BASELINES)}, or none"
            if bad
            else "--seeds: give one"
        )
    ds = open_dense(args.data, "depth" if args.task == "depth" else "seg", args.layout)
    # --threads 0 leaves torch's default here (the help says so), unlike the other probes
    bb, device, _ = open_backbone(args.backbone, args.img_size, args.device, args.threads, fill_cores=False)
    enc = DenseEncoder(bb, args.layers)
    size = bb.img_size
    stride = args.stride or max(1, size // 2)
    if not 1 <= stride <= size:
        raise ProbeError(f"--stride {stride}: give 1 to the window side {size}")
    cfg = head_config(args)
    if args.task == "depth" and (cfg.min_depth <= 0 or cfg.max_depth <= cfg.min_depth):
        raise ProbeError(f"--min-depth {cfg.min_depth} --max-depth {cfg.max_depth}: need 0 < min < max")
    for flag, value in (
        ("--epochs", cfg.epochs),
        ("--head-batch", cfg.batch),
        ("--k", args.k),
        ("--chunk", args.chunk),
    ):
        if value < 1:
            raise ProbeError(f"{flag} {value}: give at least 1")
    if args.temperature <= 0 or cfg.lr <= 0:
        raise ProbeError(f"--temperature {args.temperature} --lr {cfg.lr}: both must be positive")
    train = load_items(ds, "train", size, stride, args.view, args.max_train)
    val = load_items(ds, "val", size, stride, args.view, args.max_val)
    proto = protocol(args, ds, enc, size, stride, seeds, cfg, train, val)
    results, shown = {}, {}
    for name, model in models_for(enc, baselines).items():
        if not args.quiet:
            print(f"dense {args.task}: {name} ...", file=sys.stderr, flush=True)
        runs, shown[name] = evaluate(model, args.task, ds, train, val, proto, cfg, device, args.show)
        results[name] = summarise(runs)
    record = {
        "what": f"probe-dense-{args.task}",
        "backbone": bb.name,
        "data": str(ds.root),
        "protocol": proto,
        "results": results,
        "provenance": provenance(device),
    }
    return record, {"shown": shown, "val": val[: args.show], "ds": ds}


def protocol(args, ds, enc, size, stride, seeds, cfg, train, val) -> dict:
    """Everything the numbers depend on, for the table's header and the JSON."""
    proto = {
        "task": args.task,
        "layout": ds.layout,
        "classes": ds.num_classes,
        "img_size": size,
        "patch": enc.patch,
        "view": args.view,
        "stride": stride if args.view == "slide" else None,
        "layers": args.layers,
        "train_images": len(train),
        "train_windows": sum(len(i.corners) for i in train),
        "val_images": len(val),
        "seeds": seeds,
        "scored_at": "label size (bilinear upsampling of the window outputs)",
    }
    if args.task == "retrieval":
        return proto | {
            "k": args.k,
            "temperature": args.temperature,
            "chunk": args.chunk,
            "similarity": "cosine",
        }
    head = "BatchNorm2d + 1x1 conv"
    proto |= {
        "head": head,
        "epochs": cfg.epochs,
        "optimizer": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}",
        "schedule": f"{cfg.warmup:.0%} linear warm-up, then {cfg.schedule}",
        "head_batch": cfg.batch,
    }
    if args.task == "seg":
        return proto | {"loss": f"cross-entropy, ignore {IGNORE}"}
    depth = "log-depth" if cfg.depth_head == "log" else f"{cfg.bins} bins, DINOv2 linear normalisation"
    return proto | {
        "depth_head": depth,
        "loss": "SigLoss sqrt(var(g) + 0.15 mean(g)^2), g = log pred - log gt",
        "valid_depth_m": [cfg.min_depth, cfg.max_depth],
    }


def main(args: argparse.Namespace) -> int:
    try:
        record, extras = run(args)
    except UserError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    print(f"{record['what']}: {record['backbone']}")
    print(format_table(record))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.show:
            picture(out.with_suffix(".png"), extras, args.task, head_config(args))
            record["picture"] = str(out.with_suffix(".png"))
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}" + (f" and {record['picture']}" if args.show else ""))
    return 0
