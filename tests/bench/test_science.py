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
from bench._provenance import provenance
from train.config import load_config


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
        preset = cmd[cmd.index("--preset") + 1]
        cfg = load_config(
            preset, [a for a in cmd[cmd.index("--preset") + 2 :] if a.startswith("--") and "=" in a]
        )
        assert cfg.model.method == method.split("@")[0]
        assert cfg.data.img_size == size.img_size and cfg.data.batch_size == size.batch_size
        steps = cfg.optim.epochs * (3000 // size.batch_size)
        assert steps == pytest.approx(size.steps, abs=1e-3)
        if method.startswith("path"):
            assert cfg.model.decoder == "conv"  # the path paper's decoder


def _cell(r2: float) -> dict:
    return {
        "r2": r2,
        "r2_std": 0.01,
        "r2_sie": r2,
        "r2_sie_std": 0.01,
        "r2_seeds": [r2] * 3,
        "n_train": 5000,
        "n_test": 1500,
    }


def _records(seeds=(0, 1), methods=("vicreg", "path")):
    rng = np.random.default_rng(0)
    out = []
    for m in methods:
        for s in seeds:
            eq = {
                setting: {
                    "pairs": {},
                    "results": {
                        f: {"backbone": {"all": _cell(float(rng.uniform(-0.1, 1))), "eq": _cell(0.5)}}
                        for f in ("rotation", "blur")
                    },
                }
                for setting in ("mean/signed", "grid2/signed")
            }
            out.append(
                {
                    "method": m,
                    "seed": s,
                    "equivariance": eq,
                    "probe_s": 1.0,
                    "device_slug": "cpu",
                    "provenance": provenance("cpu"),
                }
            )
    baselines = {
        "equivariance": {
            setting: {
                "results": {
                    f: {"random": {"all": _cell(0.3)}, "pixels": {"all": _cell(0.6)}}
                    for f in ("rotation", "blur")
                }
            }
            for setting in ("mean/signed", "grid2/signed")
        }
    }
    return out, baselines


def test_summary_names_follow_design():
    records, baselines = _records()
    summary = science.summarise(records, baselines)
    for m in ("vicreg", "path"):
        for f in ("rotation", "blur"):
            assert {f"r2.{m}.{f}", f"r2_std.{m}.{f}", f"r2.{m}.{f}.mean/signed.eq"} <= set(summary)
    mine = [
        r["equivariance"]["grid2/signed"]["results"]["rotation"]["backbone"]["all"]["r2"]
        for r in records
        if r["method"] == "path"
    ]
    assert summary["r2.path.rotation"] == pytest.approx(np.mean(mine), abs=1e-4)
    assert summary["r2_std.path.rotation"] == pytest.approx(np.std(mine, ddof=1), abs=1e-4)
    assert summary["r2.pixels.rotation"] == 0.6 and summary["r2.random.rotation"] == 0.3
    assert summary["seeds"] == [0, 1] and summary["pairs"] == 5000 and summary["probe_seeds"] == 3
    one, _ = _records(seeds=(0,))
    one[0]["diagnostics"] = {"init": {"diag/grad_ratio": 0.004}, "final": {"diag/grad_ratio": 0.05}}
    single = science.summarise(one, baselines)
    assert single["r2_std.path.rotation"] is None  # one training seed: no spread, not a fake 0
    assert single["diag.vicreg.grad_ratio.init"] == 0.004 and single["diag.vicreg.grad_ratio.final"] == 0.05


def test_r2_chart_is_a_png(tmp_path):
    records, baselines = _records()
    path = tmp_path / "chart.png"
    science.r2_chart(science.summarise(records, baselines), path, "test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1000, 440)
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert {science.COLOURS[n] for n in ("vicreg", "path", "random", "pixels")} <= colours


def test_report_writes_through_write_result(tmp_path, monkeypatch):
    import bench._provenance as prov

    monkeypatch.setattr(prov, "RESULTS_DIR", tmp_path / "results")
    records, baselines = _records(seeds=(0,))
    for r in records:
        run = science.run_dir(tmp_path, r["method"], 0)
        run.mkdir(parents=True)
        (run / "train.json").write_text(json.dumps({"step": 300, "wall_s": 3.0}))
    Image.new("RGB", (8, 8)).save(science.run_dir(tmp_path, "path", 0) / "recon.png")
    data = {"n_train_crops": 3000, "sources": ["a.jpg"], "val_sources": [], "photos": "p"}
    path = science.report(tmp_path, "cpu", science.SIZES["cpu"], records, baselines, data)
    assert path == tmp_path / "results" / "science-cpu.json"
    record = json.loads(path.read_text())
    assert set(record) == {"what", "device", "versions", "git_sha", "config", "rows", "summary"}
    assert record["what"] == "science" and record["summary"] == science.summarise(records, baselines)
    assert {"torch", "triton", "dali", "cuda"} <= set(record["versions"])
    assert (tmp_path / "results" / "science-cpu-r2.png").is_file()
    assert [p.name for p in (tmp_path / "results").glob("*recon*")] == ["science-cpu-recon-path.png"]
