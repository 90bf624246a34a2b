"""bench.science's pieces that run without training: photo selection, the idx reader, the training
commands (the same budget for every method), the summary names of docs/DESIGN.md §3, the R² chart and the
report written through write_result."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from bench import science
from train.recipes import load_config
from train.schedules import peak_lr


def test_idx_reader_round_trips(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(science._idx(tmp_path / "x.gz"), images)


def test_source_photos_keep_photos_only(tmp_path):
    folder = tmp_path / "debian" / "usr" / "share" / "doc" / "opencv-doc" / "examples" / "data"
    folder.mkdir(parents=True)
    Image.new("RGB", (320, 240)).save(folder / "street.jpg")
    Image.new("L", (320, 240)).save(folder / "grey.png")
    Image.new("RGB", (320, 200)).save(folder / "small.jpg")  # short side < 240
    Image.new("1", (320, 240)).save(folder / "bits.png")  # binary, not a photo
    Image.new("RGB", (320, 240)).save(folder / "street_mask.png")
    html = tmp_path / "debian" / "usr" / "share" / "doc" / "opencv-doc" / "opencv4" / "html"
    html.mkdir(parents=True)
    Image.new("RGB", (320, 240)).save(html / "diagram.png")  # documentation figure
    assert [p.name for p in science.source_photos(tmp_path)] == ["grey.png", "street.jpg"]
    assert science.is_val_photo(folder / "street.jpg") == science.is_val_photo(tmp_path / "street.jpg")


@pytest.mark.parametrize("size_name", sorted(science.SIZES))
def test_every_method_gets_the_same_budget(size_name, tmp_path):
    size = science.SIZES[size_name]
    commands = {m: science.train_command(tmp_path, size, m, 0, n_train=3000) for m in size.methods}
    flags = {}
    for method, cmd in commands.items():
        own = size.methods[method][1]
        rest = cmd[cmd.index("--preset") + 2 : len(cmd) - len(own)]  # everything but the preset and the
        rest[rest.index("--out") + 1] = "RUN"  # method's own overrides, and the run folder, is shared
        flags[method] = rest
        assert tuple(cmd[len(cmd) - len(own) :]) == own
    assert all(f == flags["vicreg"] for f in flags.values())
    for method, cmd in commands.items():
        cfg = _config(cmd)
        assert cfg.model.method == ("none" if method == "vicreg" else method.split("-")[0])
        assert cfg.data.img_size == size.img_size and cfg.data.batch_size == size.batch_size
        steps = cfg.optim.epochs * (3000 // size.batch_size)
        assert steps == pytest.approx(size.steps, abs=1e-3)
        if method.startswith("path"):
            assert cfg.model.decoder == "conv"  # the path paper's decoder
        # Build 5's list: the papers' λ = 1, balanced λ, and balanced path without the corner cue
        balanced = method != "vicreg" and not method.endswith("-paper")
        assert cfg.model.grad_ratio == (1.0 if balanced else 0.0), method
        assert cfg.model.lam == 1.0 and cfg.data.aug.mask == ("disc" if method == "path-disc" else "none")


def _config(cmd: list[str]):
    preset = cmd[cmd.index("--preset") + 1]
    return load_config(
        preset, [a for a in cmd[cmd.index("--preset") + 2 :] if a.startswith("--") and "=" in a]
    )


def test_cpu_science_size_trains_at_the_intended_peak_lr(tmp_path):
    """The committed CPU run once trained at 1/8 of its intended lr (base 1e-3 x 32/256): peak 1e-3 now."""
    size = science.SIZES["cpu"]
    assert size.steps >= 1000 and len(size.seeds) >= 3
    for method in size.methods:
        cfg = _config(science.train_command(tmp_path, size, method, 0, n_train=3000))
        assert peak_lr(cfg.optim, cfg.data.batch_size) == pytest.approx(1e-3, rel=1e-9), method
    # The probe's power: at 2 pairs per crop (1,190 pairs of 19 photos) even raw pixels read ~0 under
    # the disc mask; the cpu size renders 13 per crop, as issue 19's reference probe did.
    from bench.science.runs import probe_config

    assert probe_config(size, ()).pairs_per_image(size.probe_images) == 13


def _cell(r2s: list[float]) -> dict:
    return {
        "r2": float(np.mean(r2s)),
        "r2_std": float(np.std(r2s, ddof=1)),
        "r2_assignments": r2s,
        "n": 300,
        "groups": 8,
        "folds": 4,
        "assignments": len(r2s),
    }


SETTINGS = ("disc/tokens", "disc/grid2", "none/tokens", "none/grid2")


def _records(seeds=(0, 1, 2), methods=("vicreg", "path")):
    """probe.json records as train.probe.equivariance writes them, and baselines.json: path scores
    vicreg's R² plus 0.2 plus per-seed noise, on every fold assignment."""
    rng = np.random.default_rng(0)
    out = []
    for s in seeds:
        base = rng.uniform(0, 0.4, size=4)
        for m in methods:
            gain = 0.0 if m == "vicreg" else 0.2 + rng.normal(0, 0.02)
            results = {
                f: {
                    st: {"backbone": {"all": _cell(list(base + gain)), "eq": _cell([0.5] * 4)}}
                    for st in SETTINGS
                }
                for f in ("rotation", "blur")
            }
            out.append(
                {
                    "method": m,
                    "seed": s,
                    "equivariance": {"pairs": {"per_family": 400, "photos": 8}, "results": results},
                    "probe_s": 1.0,
                    "device_slug": "cpu",
                    "provenance": {"git_sha": "0" * 40, "device": "cpu"},
                }
            )
    baselines = {
        "equivariance": {
            "results": {
                f: {
                    st: {"random": {"all": _cell([0.3] * 4)}, "pixels": {"all": _cell([0.6] * 4)}}
                    for st in SETTINGS
                }
                for f in ("rotation", "blur")
            }
        }
    }
    return out, baselines


def _r2(record, setting="disc/tokens", part="all"):
    return record["equivariance"]["results"]["rotation"][setting]["backbone"][part]["r2"]


def test_summary_names_follow_design():
    records, baselines = _records()
    summary = science.summarise(records, baselines)
    for f in ("rotation", "blur"):
        for m in ("vicreg", "path"):
            assert {f"r2.{m}.{f}", f"r2_std.{m}.{f}", f"r2.{m}.{f}.none/grid2.eq"} <= set(summary)
        assert {f"diff.path.{f}", f"diff_std.path.{f}", f"diff.path.{f}.none/tokens.all"} <= set(summary)
        assert f"diff.vicreg.{f}" not in summary
    mine = [_r2(r) for r in records if r["method"] == "path"]
    ref = [_r2(r) for r in records if r["method"] == "vicreg"]
    assert summary["r2.path.rotation"] == pytest.approx(np.mean(mine), abs=1e-4)  # headline: disc, tokens
    assert summary["r2_std.path.rotation"] == pytest.approx(np.std(mine, ddof=1), abs=1e-4)
    gaps = np.subtract(mine, ref)  # paired by training seed
    assert summary["diff.path.rotation"] == pytest.approx(np.mean(gaps), abs=1e-4)
    assert summary["diff_std.path.rotation"] == pytest.approx(np.std(gaps, ddof=1), abs=1e-4)
    assert (
        summary["diff_std.path.rotation"] < 0.05 < summary["r2_std.path.rotation"]
    )  # pairing removes seed noise
    assert summary["diff_positive.path.rotation.disc/tokens.all"] == "12/12"
    assert summary["r2.pixels.rotation"] == 0.6 and summary["r2.random.rotation"] == 0.3
    assert summary["seeds"] == [0, 1, 2] and summary["pairs"] == 400 and summary["photos"] == 8
    assert summary["folds"] == 4 and summary["assignments"] == 4
    one, _ = _records(seeds=(0,))
    one[0]["diagnostics"] = {"init": {"diag/grad_ratio": 0.004}, "final": {"diag/grad_ratio": 0.05}}
    single = science.summarise(one, baselines)
    assert single["r2_std.path.rotation"] is None and single["diff_std.path.rotation"] is None
    assert single["diag.vicreg.grad_ratio.init"] == 0.004 and single["diag.vicreg.grad_ratio.final"] == 0.05


def test_r2_chart_is_a_png(tmp_path):
    records, baselines = _records()
    path = tmp_path / "chart.png"
    science.r2_chart(science.summarise(records, baselines), path, "test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1000, 440)
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert {science.COLOURS[n] for n in ("vicreg", "path", "random", "pixels")} <= colours


@pytest.mark.integration  # write_result asks git for the SHA (a subprocess)
def test_report_writes_through_write_result(tmp_path, monkeypatch):
    import bench._provenance as prov

    monkeypatch.setattr(prov, "RESULTS_DIR", tmp_path / "results")
    records, baselines = _records(seeds=(0,))
    for r in records:
        run = science.run_dir(tmp_path, r["method"], 0)
        run.mkdir(parents=True)
        (run / "train.json").write_text(json.dumps({"step": 300, "wall_s": 3.0, "as_run": {"peak_lr": 1e-3}}))
    Image.new("RGB", (8, 8)).save(science.run_dir(tmp_path, "path", 0) / "recon.png")
    data = {"n_train_crops": 3000, "sources": ["a.jpg"], "val_sources": [], "photos": "p"}
    path = science.report(tmp_path, "cpu", science.SIZES["cpu"], records, baselines, data)
    assert path == tmp_path / "results" / "science-cpu.json"
    record = json.loads(path.read_text())
    assert set(record) == {"what", "device", "versions", "git_sha", "config", "rows", "summary"}
    assert record["what"] == "science" and record["summary"] == science.summarise(records, baselines)
    assert {"torch", "triton", "dali", "cuda"} <= set(record["versions"])
    timing = [row for row in record["rows"] if row.get("probe") == "timing"]
    assert len(timing) == 2 and all(row["peak_lr"] == 1e-3 for row in timing)  # the as-run lr
    assert (tmp_path / "results" / "science-cpu-r2.png").is_file()
    assert [p.name for p in (tmp_path / "results").glob("*recon*")] == ["science-cpu-recon-path.png"]


@pytest.mark.integration
def test_the_harness_trains_probes_and_reports_a_tiny_size(tmp_path, demo_shards, monkeypatch):
    """python -m bench.science end to end on the demo shards (8 steps, 2 seeds, vicreg and path without
    corners; 2 fold assignments to keep it short): paired runs, the ridge probe on both masks and pools,
    partial summaries, the report; a second call reuses every finished part."""
    from dataclasses import replace

    import bench._provenance as prov
    from bench.science.__main__ import main

    monkeypatch.setattr(prov, "RESULTS_DIR", tmp_path / "results")
    cpu = science.SIZES["cpu"]
    tiny = replace(
        cpu,
        steps=8,
        seeds=(0, 1),
        methods={m: cpu.methods[m] for m in ("vicreg", "path-disc")},
        probe_assignments=2,
        probe_pairs=0,  # the readout's minimum (the cpu size's 13 pairs per crop would take minutes)
        threads=0,
        overrides=[o for o in cpu.overrides if not o.startswith("--run.threads")] + ["--model.depth=1"],
    )
    monkeypatch.setitem(science.SIZES, "tiny", tiny)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("photos", "probe"):  # the demo's 64 train photos: 8 source-photo groups for the probe
        (work / name).symlink_to(demo_shards)
    (work / "data.json").write_text(json.dumps({"n_train_crops": 64}))
    args = ["--size", "tiny", "--work", str(work), "--parts", "train,probe,report"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "results" / "science-cpu.json").read_text())["summary"]
    partial = json.loads((work / "summary-partial.json").read_text())
    assert partial == summary
    assert summary["seeds"] == [0, 1] and summary["assignments"] == 2 and summary["photos"] == 8
    config = json.loads((tmp_path / "results" / "science-cpu.json").read_text())["config"]
    assert config["methods_reported"] == ["vicreg", "path-disc"]
    for method in ("vicreg", "path-disc"):
        for mask in ("disc", "none"):
            for pool in ("tokens", "grid2"):
                assert -1 < summary[f"r2.{method}.rotation.{mask}/{pool}.all"] <= 1
        train = json.loads((science.run_dir(work, method, 1) / "train.json").read_text())
        assert train["step"] == 8 and train["as_run"]["peak_lr"] == pytest.approx(1e-3)
    assert {"diff.path-disc.rotation", "diff_std.path-disc.rotation"} <= set(summary)
    assert summary["diff_positive.path-disc.rotation.disc/tokens.all"].endswith("/4")  # 2 seeds x 2
    assert {"r2.random.rotation", "r2.pixels.rotation"} <= set(summary)
    assert (
        json.loads((science.run_dir(work, "path-disc", 0) / "config.json").read_text())["config"]["data"][
            "aug"
        ]["mask"]
        == "disc"
    )
    probe = science.run_dir(work, "path-disc", 0) / "probe.json"
    stamp = probe.stat().st_mtime_ns
    assert main(args) == 0  # resumable: nothing is trained or probed again
    assert probe.stat().st_mtime_ns == stamp


def test_a_negative_probe_pair_count_is_one_error_line(tmp_path, capsys):
    from bench.science.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--size", "cpu", "--work", str(tmp_path), "--parts", "report", "--probe-pairs", "-3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --probe-pairs takes a count >= 0, got -3")
    assert not any(tmp_path.iterdir())  # refused before anything was written
