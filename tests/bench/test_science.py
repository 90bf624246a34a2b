"""bench.science's pieces that run without training: photo selection, the idx reader, the training
commands (the same budget for every method), the summary names of DESIGN §3 and the R² chart."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from bench import science
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
    commands = {m: science.train_command(tmp_path, size, m, 0, n_train=3000) for m in science.METHODS}
    flags = {}
    for method, cmd in commands.items():
        rest = cmd[cmd.index("--preset") + 2 :]  # everything but the preset...
        rest[rest.index("--out") + 1] = "RUN"  # ...and the run folder is the same for every method
        flags[method] = rest
    assert all(f == flags["vicreg"] for f in flags.values())
    for method, cmd in commands.items():
        preset = cmd[cmd.index("--preset") + 1]
        cfg = load_config(
            preset, [a for a in cmd[cmd.index("--preset") + 2 :] if a.startswith("--") and "=" in a]
        )
        assert cfg.model.method == method
        assert cfg.data.img_size == size.img_size and cfg.data.batch_size == size.batch_size
        steps = cfg.optim.epochs * (3000 // size.batch_size)
        assert steps == pytest.approx(size.steps, abs=1e-3)


def _records(seeds=(0, 1)):
    rng = np.random.default_rng(0)
    out = []
    for m in science.METHODS:
        for s in seeds:
            eq = {
                t: {"all": {"r2": float(rng.uniform(-0.1, 1)), "r2_sie": 0.0, "n_train": 1, "n_test": 1}}
                for t in science.TRANSFORMS
            }
            out.append(
                {"method": m, "seed": s, "equivariance": eq, "linear": {"all": {"linear_top1": 0.5 + s / 10}}}
            )
    return out


def test_summary_names_follow_design(tmp_path):
    records = _records()
    summary = science.summarise(records)
    assert set(summary) == {f"r2.{m}.{t}" for m in science.METHODS for t in science.TRANSFORMS} | {
        f"top1.{m}" for m in science.METHODS
    }
    mine = [r["equivariance"]["rotation"]["all"]["r2"] for r in records if r["method"] == "path"]
    assert summary["r2.path.rotation"] == pytest.approx(np.mean(mine), abs=1e-4)
    assert summary["top1.sie"] == pytest.approx(0.55)


def test_r2_chart_is_a_png(tmp_path):
    path = tmp_path / "chart.png"
    science.r2_chart(_records(), path, "test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (900, 420)
        # Each method's colour is drawn (its bars and legend).
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert set(science.COLOURS.values()) <= colours


def test_report_writes_design_format(tmp_path, monkeypatch):
    monkeypatch.setattr(science, "RESULTS_DIR", tmp_path / "results")
    records = _records(seeds=(0,))
    prov = science.provenance("cpu")
    for r in records:
        r.update(provenance=prov, device_slug="cpu", probe_s=1.0)
        run = science.run_dir(tmp_path, r["method"], 0)
        run.mkdir(parents=True)
        (run / "train.json").write_text(json.dumps({"step": 200, "wall_s": 3.0}))
    Image.new("RGB", (8, 8)).save(science.run_dir(tmp_path, "path", 0) / "recon.png")
    data = {"n_train_crops": 3000, "sources": ["a.jpg"], "photos": "p", "fmnist": "f"}
    path = science.report(tmp_path, "cpu", science.SIZES["cpu"], records, data)
    assert path == tmp_path / "results" / "science-cpu.json"
    record = json.loads(path.read_text())
    assert set(record) == {"what", "device", "versions", "git_sha", "config", "rows", "summary"}
    assert record["what"] == "science" and record["device"] == prov["device"]
    assert record["summary"] == science.summarise(records)
    assert {"torch", "triton", "dali", "cuda"} <= set(record["versions"])
    assert (tmp_path / "results" / "science-cpu-r2.png").is_file()
    assert [p.name for p in (tmp_path / "results").glob("*recon*")] == ["science-cpu-recon-path.png"]
