"""The science run: vicreg, sie, xattn and path pretrained side by side on the same real photos for
the same number of steps, then both probes on each; results, R² chart and reconstruction grids.

    python -m bench.science --size gpu            # ViT-S/16 at 112 px, one GPU, ~40 min in parts < 10 min
    python -m bench.science --size cpu            # tiny ViT at 64 px, ~20 min on 2 CPU cores
    python -m bench.science --size gpu --parts train --methods path --seeds 1    # one part at a time

Every part is resumable and skipped when done, so the same command continues an interrupted run:
  fetch   bench/science_data.sh fetches the photos (scikit-image wheel, Debian's opencv-doc and
          lomiri-wallpapers-16.04) and Fashion-MNIST (Debian's dataset-fashion-mnist) into WORK/raw and
          keeps only those (~60 MB; needs the Debian and PyPI registries).
  data    random crops of the photos (train crops from 5/6 of the photos, val crops from the other
          1/6) and the Fashion-MNIST images, converted into shards with pipeline.convert (offline).
  train   one `train/main.py` run per (method, seed): its preset with the same resolution, batch, step
          count and schedule for every method (a run stopped midway resumes from ckpt/last.pt).
  probe   `train.probe` on each run: equivariance R² on pairs from the held-out photos' crops, linear
          and k-NN top-1 on Fashion-MNIST (train -> val).
  report  bench/results/science-<device>.json (summary r2.<method>.<transformation> and top1.<method>:
          the backbone's pooled features, mean over seeds), science-<device>-r2.png (bars: mean, ticks:
          each seed) and science-<device>-recon-<method>.png (the trainer's last reconstruction grid).

On a GPU machine without network, with at most 10 minutes per command (the setting this was built for):
  here:  python -m bench.science --size gpu --parts fetch        # WORK = runs/science-gpu; carry WORK/raw
  GPU:   python -m bench.science --size gpu --parts data,train,probe --methods M --seeds S --copy-results $OUT
         once per method M and seed S (data, ~1 min, is redone on a fresh machine; train + probe ~5 min)
  here:  copy each $OUT's data.json and runs/ into WORK, then
         python -m bench.science --size gpu --parts report
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._provenance import RESULTS_DIR, device_slug, provenance

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("vicreg", "sie", "xattn", "path")
TRANSFORMS = ("rotation", "translation", "color", "blur", "crop", "flip")
FMNIST_CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
# Where the photos are inside the fetched packages (opencv-doc's html/ holds diagrams and screenshots).
PHOTO_DIRS = ("skimage/data/", "usr/share/backgrounds/", "opencv-doc/examples/")
# Files in the packages that are masks, ground truths, synthetic patterns or text pages, not photos.
NOT_PHOTOS = (
    "mask",
    "/color.png",
    "gt.",
    "_result",
    "trimap",
    "chessboard",
    "phantom",
    "logo",
    "horse",
    "text",
    "page",
    "digits",
    "gradient",
    "ellipses",
    "shape_sample",
    "sudoku",
    "binary",
    "blox",
    "cards",
    "detect_blob",
)


@dataclass
class Size:
    """Everything that differs between the GPU run and its CPU-sized stand-in."""

    preset: dict  # method -> train/main.py preset
    img_size: int
    batch_size: int
    steps: int
    overrides: list = field(default_factory=list)  # extra --section.field=value for every run
    crops_train: int = 40_000
    crops_val: int = 1_000
    crop_px: int = 160  # short side of the stored crops
    fmnist_train: int = 20_000
    fmnist_val: int = 5_000
    probe_images: int = 1_000
    probe_samples: int = 8
    probe_hidden: int = 1024
    probe_epochs: int = 100
    seeds: tuple = (0, 1)
    device: str = "cuda"
    threads: int = 0  # torch threads of the probes (training: --run.threads); 0 = the default


SIZES = {
    # ViT-S/16 at 112 px (7x7 tokens), batch 256 (peak lr 5e-4), 1500 steps (~10 epochs of the 40k crops).
    "gpu": Size(
        preset={m: f"vits16-{m}" for m in METHODS},
        img_size=112,
        batch_size=256,
        steps=1500,
        overrides=[
            "--optim.base_lr=5e-4",
            "--data.workers=8",
            "--run.ckpt_every=250",
            "--run.recon_every=500",
            "--run.log_every=25",
        ],
    ),
    # The demo presets' tiny ViT (4 blocks, patch 8) at 64 px, batch 32 (peak lr 8e-3 * 32/256 = 1e-3),
    # 200 steps; one thread per process (the 2-core machines it runs on are shared, where 2 threads
    # run several times slower).
    "cpu": Size(
        preset={"vicreg": "demo-vicreg", "sie": "demo-sie", "xattn": "demo-xattn", "path": "demo"},
        img_size=64,
        batch_size=32,
        steps=200,
        crops_train=3_000,
        crops_val=200,
        crop_px=96,
        fmnist_train=2_000,
        fmnist_val=500,
        probe_images=200,
        probe_samples=8,
        probe_epochs=50,
        seeds=(0,),
        device="cpu",
        threads=1,
        overrides=[
            "--optim.base_lr=8e-3",
            "--data.workers=2",
            "--run.ckpt_every=50",
            "--run.recon_every=100",
            "--run.log_every=10",
            "--run.device=cpu",
            "--run.threads=1",
        ],
    ),
}


def log(msg: str) -> None:
    print(f"[science {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- data


def source_photos(raw: Path) -> list[Path]:
    """Every photo in the fetched packages: RGB or greyscale, short side >= 240 px, not a mask or chart."""
    found = []
    for path in sorted(raw.rglob("*")):
        name = path.as_posix().lower()
        if (
            path.suffix.lower() not in (".jpg", ".jpeg", ".png")
            or not any(d in name for d in PHOTO_DIRS)
            or any(s in name for s in NOT_PHOTOS)
        ):
            continue
        try:
            with Image.open(path) as im:
                if im.mode in ("RGB", "L") and min(im.size) >= 240:
                    found.append(path)
        except OSError:
            continue
    return found


def is_val_photo(path: Path) -> bool:
    """A fixed 1/6 of the photos, by a hash of the file name: their crops are never trained on."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 6 == 0


def _write_crops(task: tuple[Path, Path, int, int, int]) -> int:
    """Random crops (8-100 % of the area, aspect 3:4-4:3) of one photo, short side resized to px."""
    photo, out, n, px, seed = task
    rng = random.Random(seed)
    with Image.open(photo) as im:
        im = im.convert("RGB")
    w, h = im.size
    for i in range(n):
        area, aspect = rng.uniform(0.08, 1.0) * w * h, rng.uniform(3 / 4, 4 / 3)
        cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = px / min(cw, ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        crop.save(out / f"{photo.stem}-{seed}-{i:05d}.jpg", quality=90)
    return n


def make_photo_crops(photos: list[Path], src: Path, size: Size, workers: int) -> None:
    """src/{train,val}/photo/*.jpg: crops spread evenly over the photos of each split."""
    tasks = []
    for split, total in (("train", size.crops_train), ("val", size.crops_val)):
        chosen = [p for p in photos if is_val_photo(p) == (split == "val")]
        out = src / split / "photo"
        out.mkdir(parents=True, exist_ok=True)
        for j, photo in enumerate(chosen):
            n = total // len(chosen) + (j < total % len(chosen))
            tasks.append(
                (photo, out, n, size.crop_px, int(hashlib.sha256(photo.name.encode()).hexdigest()[:8], 16))
            )
    with multiprocessing.Pool(workers) as pool:
        done = sum(pool.imap_unordered(_write_crops, tasks))
    log(f"wrote {done} photo crops from {len(photos)} photos into {src}")


def _idx(path: Path) -> np.ndarray:
    """An idx (MNIST format) array from its .gz file."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_fmnist(folder: Path, src: Path, size: Size) -> None:
    """src/{train,val}/<class>/*.jpg from Fashion-MNIST's train and t10k sets (the first N of each)."""
    for split, prefix, n in (("train", "train", size.fmnist_train), ("val", "t10k", size.fmnist_val)):
        images, labels = (
            _idx(folder / f"{prefix}-images-idx3-ubyte.gz"),
            _idx(folder / f"{prefix}-labels-idx1-ubyte.gz"),
        )
        for c, name in enumerate(FMNIST_CLASSES):
            (src / split / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
        for i in range(min(n, len(images))):
            c = int(labels[i])
            Image.fromarray(images[i]).save(
                src / split / f"{c}-{FMNIST_CLASSES[c]}" / f"{i:05d}.jpg", quality=95
            )
    log(f"wrote Fashion-MNIST ({size.fmnist_train} train, {size.fmnist_val} val) into {src}")


def fetch(raw: Path) -> None:
    """bench/science_data.sh into raw/ (needs Debian's and PyPI's registries), then keep only the photos
    and Fashion-MNIST (~60 MB), small enough to carry to a GPU machine that has no network."""
    if (raw / ".pruned").is_file():
        return
    subprocess.run(["bash", str(ROOT / "bench" / "science_data.sh"), str(raw), sys.executable], check=True)
    keep = set(source_photos(raw)) | set(fmnist_dir(raw).glob("*.gz"))
    for path in sorted(raw.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and path not in keep and path.name != ".done":
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    (raw / ".pruned").touch()
    log(f"fetched {len(keep)} files into {raw}")


def fmnist_dir(raw: Path) -> Path:
    return raw / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"


def prepare_data(work: Path, size: Size, workers: int) -> dict:
    """Crops of the fetched photos and Fashion-MNIST, converted into shards (offline given raw/);
    -> data.json's content: shard folders, train crop count, the photos used."""
    from pipeline.convert import convert

    raw = work / "raw"
    if not (raw / ".done").is_file():
        raise SystemExit(
            f"science: {raw} has no fetched data; run `python -m bench.science --size ... --parts fetch` "
            f"on a machine that reaches Debian and PyPI, and bring {raw} along"
        )
    photos = source_photos(raw)
    for name, make in (
        ("photos", lambda src: make_photo_crops(photos, src, size, workers)),
        ("fmnist", lambda src: make_fmnist(fmnist_dir(raw), src, size)),
    ):
        out = work / name
        if (out / "dataset.json").is_file():
            continue
        src = work / f"{name}-src"
        shutil.rmtree(src, ignore_errors=True)
        make(src)
        convert(src, out, split="all", shard_size=1000, workers=workers, seed=0, quiet=True)
        shutil.rmtree(src)
    counts = json.loads((work / "photos" / "dataset.json").read_text())["splits"]
    info = {
        "photos": str(work / "photos"),
        "fmnist": str(work / "fmnist"),
        "n_train_crops": counts["train"]["count"],
        "n_val_crops": counts["val"]["count"],
        "sources": [p.relative_to(raw).as_posix() for p in photos],
        "val_sources": [p.relative_to(raw).as_posix() for p in photos if is_val_photo(p)],
    }
    (work / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------------------ train


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
        size.preset[method],
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
    ]
    if (run / "ckpt" / "last.pt").exists():
        cmd += ["--resume", str(run / "ckpt" / "last.pt")]
    return cmd


def train_all(work: Path, size: Size, methods, seeds, n_train: int) -> None:
    for seed in seeds:
        for method in methods:
            run = run_dir(work, method, seed)
            if trained(run):
                continue
            cmd = train_command(work, size, method, seed, n_train)
            log(f"train {method} seed {seed}: {' '.join(cmd[1:])}")
            start = time.time()
            subprocess.run(cmd, check=True)
            step = torch.load(run / "ckpt" / "last.pt", map_location="cpu", weights_only=False)["step"]
            (run / "train.json").write_text(
                json.dumps({"step": step, "wall_s": round(time.time() - start, 1)}) + "\n"
            )


# ------------------------------------------------------------------------------------------ probe


def probe_run(work: Path, size: Size, method: str, seed: int, device: torch.device) -> dict:
    """Both probes on one run's last checkpoint -> (and cached in) RUN/probe.json."""
    from train import probe

    run = run_dir(work, method, seed)
    out = run / "probe.json"
    if out.is_file():
        return json.loads(out.read_text())
    loaded = probe.load_backbone(run / "ckpt" / "last.pt")
    photos = probe.read_split(work / "photos", "val", size.probe_images)
    fit = probe.FitConfig(hidden=size.probe_hidden, epochs=size.probe_epochs, seed=seed)
    start = time.time()
    eq = probe.equivariance(
        loaded.model,
        photos,
        loaded.data.aug,
        loaded.data.img_size,
        TRANSFORMS,
        loaded.model.parts,
        size.probe_samples,
        device,
        seed=seed,
        fit=fit,
        quiet=True,
    )
    train, val = probe.read_split(work / "fmnist", "train"), probe.read_split(work / "fmnist", "val")
    lin = probe.linear(loaded.model, train, val, loaded.data.img_size, loaded.model.parts, device, quiet=True)
    record = {
        "method": method,
        "seed": seed,
        "backbone": loaded.describe,
        "equivariance": eq,
        "linear": lin,
        "provenance": provenance(device),
        "device_slug": device_slug(device),
        "probe_s": round(time.time() - start, 1),
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"probed {method} seed {seed}: "
        + ", ".join(f"{t} {eq[t]['all']['r2']:.3f}" for t in TRANSFORMS)
        + f"; linear {lin['all']['linear_top1']:.3f}"
    )
    return record


# ----------------------------------------------------------------------------------------- report


def summarise(records: list[dict]) -> dict:
    """r2.<method>.<transformation> and top1.<method>: part "all", mean over seeds."""
    summary = {}
    for method in METHODS:
        mine = [r for r in records if r["method"] == method]
        if not mine:
            continue
        for t in TRANSFORMS:
            summary[f"r2.{method}.{t}"] = round(
                float(np.mean([r["equivariance"][t]["all"]["r2"] for r in mine])), 4
            )
        summary[f"top1.{method}"] = round(
            float(np.mean([r["linear"]["all"]["linear_top1"] for r in mine])), 4
        )
    return summary


COLOURS = {"vicreg": (120, 120, 120), "sie": (70, 130, 200), "xattn": (230, 150, 40), "path": (200, 50, 60)}


def r2_chart(records: list[dict], path: Path, title: str) -> None:
    """Grouped bars (PIL, no matplotlib): R² of the backbone features per transformation and method;
    bar = mean over seeds, black ticks = the individual seeds."""
    from PIL import ImageDraw, ImageFont

    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    W, H, left, top, bottom = 900, 420, 60, 50, 60
    lo, hi = -0.2, 1.0
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def y_of(v: float) -> float:  # R² -> pixel row, clipped to the axis range
        return top + (hi - max(lo, min(hi, v))) / (hi - lo) * (H - top - bottom)

    for v in np.arange(lo, hi + 1e-9, 0.2):
        d.line([(left, y_of(v)), (W - 10, y_of(v))], fill=(225, 225, 225) if abs(v) > 1e-9 else (0, 0, 0))
        d.text((10, y_of(v) - 6), f"{v:+.1f}", fill="black", font=font)
    group = (W - left - 10) / len(TRANSFORMS)
    bar = group * 0.8 / max(1, len(methods))
    for i, t in enumerate(TRANSFORMS):
        x0 = left + i * group + group * 0.1
        for j, m in enumerate(methods):
            vals = [r["equivariance"][t]["all"]["r2"] for r in records if r["method"] == m]
            xa, xb = x0 + j * bar, x0 + (j + 1) * bar - 2
            d.rectangle(
                [xa, min(y_of(0), y_of(np.mean(vals))), xb, max(y_of(0), y_of(np.mean(vals)))],
                fill=COLOURS[m],
            )
            for v in vals:
                d.line([(xa, y_of(v)), (xb, y_of(v))], fill="black", width=2)
        d.text((x0, H - bottom + 8), t, fill="black", font=font)
    for j, m in enumerate(methods):
        d.rectangle([left + 10 + j * 110, 28, left + 22 + j * 110, 40], fill=COLOURS[m])
        d.text((left + 28 + j * 110, 28), m, fill="black", font=font)
    d.text((left, 8), title, fill="black", font=font)
    # PIL's built-in font has no "²" or "θ".
    d.text(
        (left, H - 25),
        "R^2 of theta from frozen (x, g(x)) embeddings of held-out photos (backbone features); "
        "bar: mean over seeds, ticks: seeds",
        fill=(90, 90, 90),
        font=font,
    )
    img.save(path)


def report(work: Path, size_name: str, size: Size, records: list[dict], data: dict) -> Path:
    """bench/results/science-<device>.json (DESIGN §3) and the PNGs. The device, versions and git SHA
    are those recorded when the runs were probed, so a report assembled on another machine (from
    results copied back from the GPU machine) still names the GPU."""
    slugs = {r["device_slug"] for r in records}
    if len(slugs) > 1:
        raise SystemExit(
            f"science: the runs were probed on different devices ({', '.join(sorted(slugs))}); "
            f"report them separately (--methods/--seeds)"
        )
    slug, prov = slugs.pop(), records[0]["provenance"]
    rows = []
    for r in records:
        for t in TRANSFORMS:
            for part, v in r["equivariance"][t].items():
                rows.append(
                    {
                        "method": r["method"],
                        "seed": r["seed"],
                        "probe": "equivariance",
                        "transformation": t,
                        "part": part,
                        **v,
                    }
                )
        for part, v in r["linear"].items():
            rows.append({"method": r["method"], "seed": r["seed"], "probe": "linear", "part": part, **v})
        trained_ = json.loads((run_dir(work, r["method"], r["seed"]) / "train.json").read_text())
        rows.append(
            {
                "method": r["method"],
                "seed": r["seed"],
                "probe": "timing",
                "probe_s": r["probe_s"],
                "train_s": trained_["wall_s"],
                "steps": trained_["step"],
                "git_sha": r["provenance"]["git_sha"],
            }
        )
    config = {
        "size": size_name,
        **asdict(size),
        "seeds": sorted({r["seed"] for r in records}),
        "data": {k: v for k, v in data.items() if k != "sources"},
        "n_source_photos": len(data["sources"]),
        "command": {m: train_command(work, size, m, 0, data["n_train_crops"])[2:] for m in size.preset},
    }
    record = {"what": "science", **prov, "config": config, "rows": rows, "summary": summarise(records)}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"science-{slug}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    r2_chart(records, RESULTS_DIR / f"science-{slug}-r2.png", f"science run ({size_name}): {prov['device']}")
    for method in METHODS:
        grid = run_dir(work, method, min(config["seeds"])) / "recon.png"
        if grid.is_file():
            shutil.copyfile(grid, RESULTS_DIR / f"science-{slug}-recon-{method}.png")
    return path


KEEP = ("train.json", "probe.json", "recon.png", "config.json", "metrics.jsonl")  # what --copy-results copies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="gpu")
    ap.add_argument("--work", default="", help="data, runs and probe results (default: runs/science-<size>)")
    ap.add_argument("--parts", default="fetch,data,train,probe,report")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="", help="comma list (default: the size's seeds)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, (multiprocessing.cpu_count() or 2))))
    ap.add_argument(
        "--copy-results", default="", help="copy each probed run's small files (no checkpoints) here"
    )
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    work = Path(args.work or ROOT / "runs" / f"science-{args.size}").resolve()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s] or list(size.seeds)
    parts = [p for p in args.parts.split(",") if p]
    if bad := [m for m in methods if m not in METHODS]:
        ap.error(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if bad := [p for p in parts if p not in ("fetch", "data", "train", "probe", "report")]:
        ap.error(f"--parts: unknown part {bad[0]!r}; choose from fetch, data, train, probe, report")
    if size.device == "cuda" and not torch.cuda.is_available() and {"train", "probe"} & set(parts):
        ap.error("--size gpu needs a CUDA GPU; use --size cpu for the CPU-sized run")
    work.mkdir(parents=True, exist_ok=True)
    if size.threads:
        # On a CPU shared with other jobs, one thread per process avoids stragglers in every matmul.
        torch.set_num_threads(size.threads)
    if "fetch" in parts:
        fetch(work / "raw")
    if "data" in parts:
        prepare_data(work, size, args.workers)
    data = json.loads((work / "data.json").read_text()) if {"train", "report"} & set(parts) else {}
    if "train" in parts:
        train_all(work, size, methods, seeds, data["n_train_crops"])
    runs = [(m, s) for s in seeds for m in methods]
    if "probe" in parts:
        for method, seed in runs:
            if trained(run_dir(work, method, seed)):
                probe_run(work, size, method, seed, torch.device(size.device))
    if args.copy_results:
        Path(args.copy_results).mkdir(parents=True, exist_ok=True)
        if (work / "data.json").is_file():
            shutil.copyfile(work / "data.json", Path(args.copy_results) / "data.json")
        for method, seed in runs:
            run, dst = run_dir(work, method, seed), Path(args.copy_results) / "runs" / f"{method}-s{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for name in KEEP:
                if (run / name).is_file():
                    shutil.copyfile(run / name, dst / name)
    if "report" in parts:
        # Every probed run found, also those whose results were copied back from another machine.
        records = [
            json.loads((run_dir(work, m, s) / "probe.json").read_text())
            for m, s in runs
            if (run_dir(work, m, s) / "probe.json").is_file()
        ]
        if not records:
            raise SystemExit(
                f"science: no probed runs under {work / 'runs'}; run the train and probe parts first"
            )
        path = report(work, args.size, size, records, data)
        log(f"wrote {path}")
        for key, value in summarise(records).items():
            print(f"  {key:<28} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
