"""The science run's training and probing: one train/main.py run per (method, seed), then the
equivariance probe of train.probe on its last checkpoint, cached in RUN/probe.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.science.data import ROOT, log
from bench.science.sizes import Size
from train.provenance import device_slug, provenance


def run_dir(work: Path, method: str, seed: int) -> Path:
    return work / "runs" / f"{method}-s{seed}"


def trained(run: Path) -> bool:
    """The run finished its schedule: train/main.py exited cleanly and train.json was written after it."""
    return (run / "train.json").is_file()


def train_command(work: Path, size: Size, method: str, seed: int, n_train: int) -> list[str]:
    """The train/main.py command: same resolution, batch, steps and schedule for every method."""
    per_epoch = n_train // size.batch_size
    epochs = size.steps / per_epoch  # the schedule ends exactly at size.steps
    run = run_dir(work, method, seed)
    cmd = [
        sys.executable,
        str(ROOT / "train" / "main.py"),
        "--preset",
        size.methods[method][0],
        "--data",
        str(work / "photos"),
        "--out",
        str(run),
        f"--data.img_size={size.img_size}",
        f"--data.batch_size={size.batch_size}",
        f"--optim.epochs={epochs:.6f}",
        f"--optim.warmup_epochs={epochs / 10:.6f}",
        f"--run.seed={seed}",
        f"--data.seed={seed}",
        *size.overrides,
        *size.methods[method][1],
    ]
    if (run / "ckpt" / "last.pt").exists():
        cmd += ["--resume", str(run / "ckpt" / "last.pt")]
    return cmd


def train_one(work: Path, size: Size, method: str, seed: int, n_train: int) -> None:
    """One run to the end of its schedule (resumed from its last checkpoint); RUN/train.json marks it done."""
    run = run_dir(work, method, seed)
    if trained(run):
        return
    cmd = train_command(work, size, method, seed, n_train)
    log(f"train {method} seed {seed}: {' '.join(cmd[1:])}")
    start = time.time()
    subprocess.run(cmd, check=True)
    step = torch.load(run / "ckpt" / "last.pt", map_location="cpu", weights_only=True)["step"]
    as_run = json.loads((run / "config.json").read_text()).get("as_run", {})
    (run / "train.json").write_text(
        json.dumps({"step": step, "wall_s": round(time.time() - start, 1), "as_run": as_run}) + "\n"
    )


def probe_config(size: Size, baselines: tuple[str, ...]):
    """train.probe's ProbeConfig of this size: the ridge readout, both masks, every pool in one pass;
    the fold assignments depend on the pairs' source photos and pair_seed only, so every backbone and
    baseline is scored on the same folds and differences between runs are paired."""
    from train.probes import ProbeConfig

    return ProbeConfig(
        transforms=size.probe_families,
        size=size.img_size,
        min_train_pairs=size.probe_pairs,
        target="signed",
        pool=",".join(size.probe_pools),
        mask=",".join(size.probe_masks),
        protocol="ridge",
        folds=size.probe_folds,
        assignments=size.probe_assignments,
        baselines=baselines,
    )


def _probe(bb, samples, size: Size, device: torch.device, baselines: tuple[str, ...]) -> dict:
    """train.probe.equivariance's record for one backbone (parts all and eq only: inv is what the SSL
    loss makes invariant), or for the baselines alone (its random-init twin and raw pixels)."""
    from train.probe_embed import Embedder
    from train.probes import embedders_for, equivariance

    emb = Embedder.from_backbone(bb, size.probe_pools[0])
    emb.parts = tuple(p for p in emb.parts if p in ("all", "eq"))
    models = embedders_for(emb, baselines)
    if baselines:  # the baseline pass probes only the baselines
        models.pop("backbone")
    return equivariance(models, samples, probe_config(size, baselines), device, quiet=True)


def train_diagnostics(run: Path, batches: int = 4) -> dict:
    """model.diagnostics (gradient ratio, own/other reconstruction MSE) of the trained model and of a
    fresh init of the same config, averaged over the first `batches` batches of the training data."""
    from dataclasses import replace

    from model import build_method
    from model.diagnostics import diagnostics
    from pipeline import build_loader
    from train.export import load_method

    trained_method, ckpt = load_method(run / "ckpt" / "last.pt")
    from train.config import from_dict

    cfg = from_dict(ckpt["config"])
    torch.manual_seed(cfg.run.seed)
    fresh = build_method(cfg.model, cfg.data)
    loader = build_loader(replace(cfg.data, loader="reference", workers=0), device="cpu")
    out: dict = {"init": {}, "final": {}}
    for i, batch in enumerate(loader):
        if i == batches:
            break
        for name, method in (("init", fresh), ("final", trained_method)):
            method.train()  # BatchNorm in the expanders: training statistics, as in a step
            for k, v in diagnostics(method, batch).items():
                out[name][k] = out[name].get(k, 0.0) + v / batches
    return out


def probe_run(work: Path, size: Size, method: str, seed: int, device: torch.device) -> dict:
    """The equivariance probe on one run's last checkpoint -> (and cached in) RUN/probe.json."""
    from train.backbones import load_backbone
    from train.probes import read_split

    run = run_dir(work, method, seed)
    out = run / "probe.json"
    if out.is_file():
        return json.loads(out.read_text())
    start = time.time()
    bb = load_backbone(run / "ckpt" / "last.pt")
    samples = read_split(work / "probe", "train", size.probe_images)
    record = {
        "method": method,
        "seed": seed,
        "backbone": bb.name,
        "equivariance": _probe(bb, samples, size, device, ()),
        "diagnostics": train_diagnostics(run),
        "provenance": provenance(device),
        "device_slug": device_slug(device),
        "probe_s": round(time.time() - start, 1),
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    family, by_setting = next(iter(record["equivariance"]["results"].items()))
    setting, by_model = next(iter(by_setting.items()))
    log(
        f"probed {method} seed {seed} in {record['probe_s']} s: {family} R² ({setting}, backbone) "
        f"{by_model['backbone']['all']['r2']:.3f}"
    )
    return record


def probe_baselines(work: Path, size: Size, device: torch.device, ckpt: Path) -> dict:
    """The random-init and pixel baselines, once (same backbone architecture for every method: the
    finished run's checkpoint `ckpt` gives it; the pairs are the runs' pairs) -> work/baselines.json."""
    from train.backbones import load_backbone
    from train.probes import BASELINES, read_split

    out = work / "baselines.json"
    if out.is_file():
        return json.loads(out.read_text())
    samples = read_split(work / "probe", "train", size.probe_images)
    record = {"equivariance": _probe(load_backbone(ckpt), samples, size, device, BASELINES)}
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record
