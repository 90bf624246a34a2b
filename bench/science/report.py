"""The science run's report: bench/results/science-<device>.json through write_result, the R² chart
and the reconstruction grids.

Summary keys (docs/DESIGN.md §3): the headline setting is the backbone's features ("all"), 2×2 grid pooling
(mean pooling loses the sign of a rotation), signed target:
    r2.<method>.<family>, r2_std.<method>.<family>   mean and std over training seeds (each run's
                                                     value is the mean over its probe seeds)
    r2.pixels.<family>, r2.random.<family>           the sanity baselines on the same pairs
    r2.<method>.<family>.<pool>/<target>.<part>      every setting probed (and its r2_std twin)
    seeds, probe_seeds, pairs                        training seeds, probe seeds, train pairs per family
    diag.<method>.<key>.<init|final>                 model.diagnostics (gradient ratio, own/other
                                                     reconstruction MSE), mean over training seeds
r2_std is null for a method trained with one seed only (the sweep).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench import _provenance
from bench.science.runs import run_dir, train_command
from bench.science.sizes import Size

HEADLINE = ("grid2/signed", "all")
COLOURS = {
    "vicreg": (120, 120, 120),
    "sie": (70, 130, 200),
    "xattn": (230, 150, 40),
    "path": (200, 50, 60),
    "path@lam30": (240, 120, 130),
    "path@sum": (140, 20, 40),
    "random": (190, 190, 160),
    "pixels": (60, 160, 90),
}


def _value(eq: dict, setting: str, family: str, model: str, part: str) -> dict | None:
    return eq.get(setting, {}).get("results", {}).get(family, {}).get(model, {}).get(part)


def summarise(records: list[dict], baselines: dict) -> dict:
    """The summary keys of the module docstring from the runs' probe.json records and baselines.json."""
    summary: dict = {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    settings = list(records[0]["equivariance"])
    families = list(records[0]["equivariance"][settings[0]]["results"])
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        for setting in settings:
            for family in families:
                for part in ("all", "eq"):
                    vals = [
                        v["r2"]
                        for r in mine
                        if (v := _value(r["equivariance"], setting, family, "backbone", part))
                    ]
                    if not vals:
                        continue
                    # one training seed has no spread to report: null, not a misleading 0
                    mean = round(float(np.mean(vals)), 4)
                    std = round(float(np.std(vals, ddof=1)), 4) if len(vals) > 1 else None
                    summary[f"r2.{method}.{family}.{setting}.{part}"] = mean
                    summary[f"r2_std.{method}.{family}.{setting}.{part}"] = std
                    if (setting, part) == HEADLINE:
                        summary[f"r2.{method}.{family}"] = mean
                        summary[f"r2_std.{method}.{family}"] = std
    for base in ("random", "pixels"):
        for setting in settings:
            for family in families:
                v = _value(baselines["equivariance"], setting, family, base, "all")
                if v is None:
                    continue
                summary[f"r2.{base}.{family}.{setting}.all"] = round(v["r2"], 4)
                summary[f"r2_std.{base}.{family}.{setting}.all"] = round(v["r2_std"], 4)  # over probe seeds
                if setting == HEADLINE[0]:
                    summary[f"r2.{base}.{family}"] = round(v["r2"], 4)
                    summary[f"r2_std.{base}.{family}"] = round(v["r2_std"], 4)  # over probe seeds
    for method in methods:
        mine = [r for r in records if r["method"] == method and "diagnostics" in r]
        for when in ("init", "final"):
            for key in mine[0]["diagnostics"][when] if mine else {}:
                short = key.removeprefix("diag/")
                summary[f"diag.{method}.{short}.{when}"] = round(
                    float(np.mean([r["diagnostics"][when][key] for r in mine])), 5
                )
    first = records[0]["equivariance"][settings[0]]
    summary["seeds"] = sorted({r["seed"] for r in records})
    summary["probe_seeds"] = len(
        next(iter(next(iter(first["results"].values())).values()))["all"]["r2_seeds"]
    )
    summary["pairs"] = next(iter(next(iter(first["results"].values())).values()))["all"]["n_train"]
    return summary


def r2_chart(summary: dict, path: Path, title: str, family: str = "rotation") -> None:
    """Grouped bars (PIL, no matplotlib): one group per (setting, part), one bar per method and
    baseline; bar = mean over training seeds, whisker = ± std over them."""
    keys = [k for k in summary if k.startswith("r2.") and f".{family}." in k and k.count(".") >= 4]
    names = list(dict.fromkeys(k.split(".")[1] for k in keys))
    groups = list(dict.fromkeys(k.split(f".{family}.", 1)[1] for k in keys))
    W, H, left, top, bottom = 1000, 440, 60, 60, 70
    lo, hi = -0.4, 1.0
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def y_of(v: float) -> float:  # R² -> pixel row, clipped to the axis range
        return top + (hi - max(lo, min(hi, v))) / (hi - lo) * (H - top - bottom)

    for v in np.arange(lo, hi + 1e-9, 0.2):
        d.line([(left, y_of(v)), (W - 10, y_of(v))], fill=(225, 225, 225) if abs(v) > 1e-9 else (0, 0, 0))
        d.text((10, y_of(v) - 6), f"{v:+.1f}", fill="black", font=font)
    width = (W - left - 10) / max(1, len(groups))
    bar = width * 0.85 / max(1, len(names))
    for i, group in enumerate(groups):
        x0 = left + i * width + width * 0.075
        for j, name in enumerate(names):
            mean = summary.get(f"r2.{name}.{family}.{group}")
            if mean is None:
                continue
            std = summary.get(f"r2_std.{name}.{family}.{group}") or 0.0
            xa, xb = x0 + j * bar, x0 + (j + 1) * bar - 1
            d.rectangle(
                [xa, min(y_of(0), y_of(mean)), xb, max(y_of(0), y_of(mean))],
                fill=COLOURS.get(name, (0, 0, 0)),
            )
            xc = (xa + xb) / 2
            d.line([(xc, y_of(mean - std)), (xc, y_of(mean + std))], fill="black", width=1)
        d.text((x0, H - bottom + 8), group, fill="black", font=font)
    for j, name in enumerate(names):
        d.rectangle([left + 10 + j * 115, 32, left + 22 + j * 115, 44], fill=COLOURS.get(name, (0, 0, 0)))
        d.text((left + 28 + j * 115, 32), name, fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    # PIL's built-in font has no "²", "θ" or "±".
    d.text(
        (left, H - 30),
        f"R^2 of {family} from frozen (x, g(x)) embeddings, held-out source photos; groups: "
        "pool/target.part; bar: mean over training seeds, whisker: +-std",
        fill=(90, 90, 90),
        font=font,
    )
    img.save(path)


def report(work: Path, size_name: str, size: Size, records: list[dict], baselines: dict, data: dict) -> Path:
    """bench/results/science-<device>.json (via write_result) and the PNGs. The device is the one the
    runs were probed on, so a report assembled on another machine still names it."""
    slugs = {r["device_slug"] for r in records}
    if len(slugs) > 1:
        raise SystemExit(
            f"science: the runs were probed on different devices ({', '.join(sorted(slugs))}); "
            f"report them separately (--methods/--seeds)"
        )
    slug = slugs.pop()
    rows = []
    for r in records:
        for setting, eq in r["equivariance"].items():
            for family, by_model in eq["results"].items():
                for part, v in by_model["backbone"].items():
                    rows.append(
                        {
                            "method": r["method"],
                            "seed": r["seed"],
                            "setting": setting,
                            "family": family,
                            "part": part,
                            **v,
                        }
                    )
        trained_ = run_dir(work, r["method"], r["seed"]) / "train.json"
        timing = json.loads(trained_.read_text()) if trained_.is_file() else {}
        rows.append(
            {
                "method": r["method"],
                "seed": r["seed"],
                "probe": "timing",
                "probe_s": r["probe_s"],
                "train_s": timing.get("wall_s"),
                "steps": timing.get("step"),
                "git_sha": r["provenance"]["git_sha"],
            }
        )
    summary = summarise(records, baselines)
    config = {
        "size": size_name,
        **asdict(size),
        "headline": "/".join(HEADLINE),
        "data": {k: v for k, v in data.items() if k not in ("sources", "val_sources")},
        "n_source_photos": len(data.get("sources", [])),
        "n_probe_photos": len(data.get("val_sources", [])),
        "command": {
            m: train_command(work, size, m, 0, data.get("n_train_crops", 1))[2:] for m in size.methods
        },
    }
    path = _provenance.write_result("science", config, rows, summary, device=slug)
    r2_chart(
        summary, _provenance.RESULTS_DIR / f"science-{slug}-r2.png", f"science run ({size_name}, {slug})"
    )
    for method in size.methods:
        grid = run_dir(work, method, min(summary["seeds"])) / "recon.png"
        if grid.is_file():
            shutil.copyfile(grid, _provenance.RESULTS_DIR / f"science-{slug}-recon-{method}.png")
    return path
