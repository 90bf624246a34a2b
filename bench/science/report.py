"""The science run's report: bench/results/science-<device>.json through write_result, the R² chart
and the reconstruction grids.

Summary keys (docs/DESIGN.md §3). Each run is probed by the ridge readout (train/probe_ridge.py) over
the same fold assignments of the held-out photos' pairs, so two runs of one training seed are paired.
The headline setting is the disc mask (content orientation only, no corner cue), token features,
the backbone's whole z ("all"), signed target:
    r2.<method>.<family>, r2_std.<method>.<family>     mean and std over training seeds (each run's
                                                       value is the mean over its fold assignments)
    diff.<method>.<family>, diff_std.<method>.<family> paired difference against vicreg: per training
                                                       seed (same init and batches), then mean and std
    r2.pixels.<family>, r2.random.<family>             the sanity baselines on the same pairs
    <key>.<family>.<mask>/<pool>.<part>                every setting probed, for each key above
    diff_positive.<method>.<family>.<setting>.<part>   assignments x seeds where the method beats vicreg
    seeds, pairs, photos, folds, assignments           training seeds; pairs per family and mask; the
                                                       probe's source photos; the ridge's CV
    diag.<method>.<key>.<init|final>                   model.diagnostics (gradient ratio, own/other
                                                       reconstruction MSE), mean over training seeds
A std over a single seed is null, not a misleading 0.
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

HEADLINE = ("disc/tokens", "all")  # mask/pool, part
REFERENCE = "vicreg"  # what the paired differences are taken against
COLOURS = {
    "vicreg": (120, 120, 120),
    "path-paper": (240, 120, 130),
    "path": (200, 50, 60),
    "xattn-paper": (245, 200, 120),
    "xattn": (230, 150, 40),
    "path-disc": (140, 20, 40),
    "sie": (70, 130, 200),
    "random": (190, 190, 160),
    "pixels": (60, 160, 90),
}


def _cell(eq: dict, family: str, setting: str, model: str, part: str) -> dict | None:
    return eq.get("results", {}).get(family, {}).get(setting, {}).get(model, {}).get(part)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return round(float(np.mean(values)), 4), (
        round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None
    )


def summarise(records: list[dict], baselines: dict) -> dict:
    """The summary keys of the module docstring from the runs' probe.json records and baselines.json."""
    summary: dict = {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    results = records[0]["equivariance"]["results"]
    families = list(results)
    settings = list(results[families[0]])
    by_seed = {(r["method"], r["seed"]): r["equivariance"] for r in records}
    seeds = sorted({r["seed"] for r in records})

    def put(name: str, method: str, family: str, setting: str, part: str, value) -> None:
        summary[f"{name}.{method}.{family}.{setting}.{part}"] = value
        if (setting, part) == HEADLINE and name != "diff_positive":
            summary[f"{name}.{method}.{family}"] = value

    for method in methods:
        for family in families:
            for setting in settings:
                for part in ("all", "eq"):
                    cells = {
                        s: c
                        for s in seeds
                        if (c := _cell(by_seed.get((method, s), {}), family, setting, "backbone", part))
                    }
                    if not cells:
                        continue
                    mean, std = _mean_std([c["r2"] for c in cells.values()])
                    put("r2", method, family, setting, part, mean)
                    put("r2_std", method, family, setting, part, std)
                    ref = {
                        s: c
                        for s in cells
                        if (c := _cell(by_seed.get((REFERENCE, s), {}), family, setting, "backbone", "all"))
                    }
                    if method == REFERENCE or part != "all" or not ref:
                        continue
                    # same seed = same init and batches, same probe folds: a paired difference per seed
                    per_assignment = [
                        a - b
                        for s in ref
                        for a, b in zip(cells[s]["r2_assignments"], ref[s]["r2_assignments"])
                    ]
                    mean, std = _mean_std([cells[s]["r2"] - ref[s]["r2"] for s in ref])
                    put("diff", method, family, setting, part, mean)
                    put("diff_std", method, family, setting, part, std)
                    put(
                        "diff_positive",
                        method,
                        family,
                        setting,
                        part,
                        f"{sum(d > 0 for d in per_assignment)}/{len(per_assignment)}",
                    )
    for base in ("random", "pixels"):
        for family in families:
            for setting in settings:
                v = _cell(baselines["equivariance"], family, setting, base, "all")
                if v is not None:
                    put("r2", base, family, setting, "all", round(v["r2"], 4))
                    put("r2_std", base, family, setting, "all", round(v["r2_std"], 4))  # over assignments
    for method in methods:
        mine = [r for r in records if r["method"] == method and "diagnostics" in r]
        for when in ("init", "final"):
            for key in mine[0]["diagnostics"][when] if mine else {}:
                short = key.removeprefix("diag/")
                summary[f"diag.{method}.{short}.{when}"] = round(
                    float(np.mean([r["diagnostics"][when][key] for r in mine])), 5
                )
    first = records[0]["equivariance"]
    cell = _cell(first, families[0], settings[0], "backbone", "all") or {}
    summary["seeds"] = seeds
    summary["pairs"] = first["pairs"]["per_family"]
    summary["photos"] = first["pairs"]["photos"]
    summary["folds"], summary["assignments"] = cell.get("folds"), cell.get("assignments")
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
        "mask/pool.part; bar: mean over training seeds, whisker: +-std",
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
        for family, by_setting in r["equivariance"]["results"].items():
            for setting, by_model in by_setting.items():
                for part, v in by_model["backbone"].items():
                    rows.append(
                        {
                            "method": r["method"],
                            "seed": r["seed"],
                            "setting": setting,
                            "family": family,
                            "part": part,
                            **{k: v[k] for k in ("r2", "r2_std", "r2_assignments", "n", "groups") if k in v},
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
                "peak_lr": timing.get("as_run", {}).get("peak_lr"),  # as run, after the batch scaling
                "git_sha": r["provenance"]["git_sha"],
            }
        )
    summary = summarise(records, baselines)
    config = {
        "size": size_name,
        **asdict(size),
        "headline": "/".join(HEADLINE),
        "methods_reported": list(dict.fromkeys(r["method"] for r in records)),  # `methods`: the size's
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
