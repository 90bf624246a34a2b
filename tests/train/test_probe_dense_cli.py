"""`train/probe.py dense` end to end: each task on the synthetic sets from an export folder, a training
checkpoint and `timm:NAME`; every reader's layout through the CLI; the JSON (protocol, provenance,
random-init row) and the picture; one-line errors; and the power check (a fine-tuned backbone beats
the random twin clearly, a constant feature scores chance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dense_layouts import make_ade, make_nyu, make_voc, write_png
from PIL import Image

from pipeline import dense_synth
from train import probe
from train.dense_power import power_check

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
QUICK = ["--epochs", "3", "--seeds", "0,1", "--quiet"]


@pytest.fixture(scope="module")
def seg_set(tmp_path_factory):
    return dense_synth.build(tmp_path_factory.mktemp("seg"), "seg", 12, 4, (48, 64))


@pytest.fixture(scope="module")
def depth_set(tmp_path_factory):
    return dense_synth.build(tmp_path_factory.mktemp("depth"), "depth", 12, 4, (48, 64))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = probe.main(["dense", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_seg_from_an_export_writes_json_table_and_picture(trained, seg_set, tmp_path, capsys):
    out = tmp_path / "seg.json"
    rc, stdout, err = _run(
        capsys, "--task", "seg", "--backbone", trained[1], "--data", seg_set, *QUICK, "--out", out
    )
    assert rc == 0, err
    record = json.loads(out.read_text())
    p = record["protocol"]
    assert (p["task"], p["img_size"], p["patch"], p["layers"], p["view"]) == ("seg", 32, 8, 1, "slide")
    assert p["seeds"] == [0, 1] and p["train_images"] == 12 and p["train_windows"] == 24 and p["classes"] == 8
    assert record["provenance"]["versions"]["torch"] and "git_sha" in record["provenance"]
    assert set(record["results"]) == {"backbone", "random"}
    for r in record["results"].values():
        assert 0 <= r["miou"] <= 1 and 0 <= r["pacc"] <= 1 and r["miou_std"] >= 0 and len(r["per_seed"]) == 2
    # protocol above the table, the random-init row beside the backbone
    assert stdout.index("img_size: 32") < stdout.index("features") < stdout.index("random")
    picture = Image.open(record["picture"])
    assert picture.size[0] >= 4 * 96 and picture.size[1] >= 4 * 96  # image, truth, backbone, random × 4 rows


def test_depth_from_timm_and_both_heads(depth_set, tmp_path, capsys):
    for head in ("log", "bins"):
        out = tmp_path / f"{head}.json"
        argv = ["--task", "depth", "--backbone", "timm:vit_tiny_patch16_224", "--img-size", 32]
        argv += [
            "--data",
            depth_set,
            "--depth-head",
            head,
            "--bins",
            16,
            "--lr",
            "1e-2",
            *QUICK,
            "--out",
            out,
        ]
        rc, stdout, err = _run(capsys, *argv)
        assert rc == 0, err
        record = json.loads(out.read_text())
        assert record["protocol"]["valid_depth_m"] == [1e-3, 10.0]
        for r in record["results"].values():
            assert r["rmse"] > 0 and r["absrel"] > 0 and 0 <= r["delta1"] <= 1
        assert "rmse" in stdout and "random" in stdout


def test_retrieval_from_a_checkpoint_chunked_equals_unchunked(trained, seg_set, tmp_path, capsys):
    results = []
    for chunk in (4096, 100):  # the bank holds 24 windows × 16 patches = 384 rows: 1 chunk, then 4
        out = tmp_path / f"r{chunk}.json"
        argv = [
            "--task",
            "retrieval",
            "--backbone",
            trained[0],
            "--data",
            seg_set,
            "--chunk",
            chunk,
            "--k",
            10,
        ]
        rc, _, err = _run(capsys, *argv, "--quiet", "--out", out)
        assert rc == 0, err
        results.append(json.loads(out.read_text())["results"])
    assert results[0] == results[1]
    assert 0 < results[0]["backbone"]["miou"] <= 1 and results[0]["backbone"]["miou_std"] == 0


@pytest.mark.parametrize("layout", ["voc", "ade20k", "nyu"])
def test_every_layout_through_the_cli(layout, trained, tmp_path, capsys):
    root = {"voc": make_voc, "ade20k": make_ade, "nyu": make_nyu}[layout](tmp_path)
    task = "depth" if layout == "nyu" else "seg"
    rc, stdout, err = _run(
        capsys,
        "--task",
        task,
        "--backbone",
        trained[1],
        "--data",
        root,
        "--epochs",
        1,
        "--seeds",
        0,
        "--quiet",
    )
    assert rc == 0, err
    assert f"layout: {layout}" in stdout and "random" in stdout


def test_bad_data_is_one_error_line(trained, tmp_path, capsys):
    root = make_voc(tmp_path, val_list=False)
    rc, _, err = _run(capsys, "--task", "seg", "--backbone", trained[1], "--data", root)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "missing split list" in err
    nyu = make_nyu(tmp_path / "nyu")
    rc, _, err = _run(capsys, "--task", "seg", "--backbone", trained[1], "--data", nyu)
    assert rc == 2 and "holds depth labels, not seg" in err and err.count("\n") == 1
    depth_png = next((nyu / "official_splits" / "test").rglob("sync_depth_*.png"))
    write_png(depth_png, np.full((20, 30), 25, np.uint8))  # 8-bit depth
    rc, _, err = _run(capsys, "--task", "depth", "--backbone", trained[1], "--data", nyu)
    assert rc == 2 and err.startswith("error: ") and "16-bit" in err and err.count("\n") == 1
    rc, _, err = _run(
        capsys, "--task", "retrieval", "--backbone", trained[1], "--data", make_voc(tmp_path / "v"), "--k", 0
    )
    assert rc == 2 and err == "error: --k 0: give at least 1\n"


def test_power_check_seg_and_retrieval(trained, tmp_path):
    # Small sizes and one probe seed; the README's figures come from `python -m train.dense_power`.
    record = power_check(
        str(trained[1]), ("seg", "retrieval"), steps=300, n_train=16, n_val=6, seeds=(0,), workdir=tmp_path
    )
    for task, r in record["results"].items():
        assert r["finetuned"]["miou"] > r["random"]["miou"] + 0.05, (task, r)
        # constant features: one class everywhere, so mean accuracy = 1 / (classes in the val truth)
        assert r["constant"]["miou"] < 0.1 and r["constant"]["macc"] <= 0.2, (task, r)
        assert r["random"]["miou"] > r["constant"]["miou"] + 0.1, (task, r)


def test_power_check_depth(trained, tmp_path):
    # Depth needs 300 fine-tuning steps and the default 8 val scenes for a clear gap (150 steps and 6
    # scenes gave δ1 0.51 against the twin's 0.45, measured).
    r = power_check(str(trained[1]), ("depth",), steps=300, seeds=(0,), workdir=tmp_path)["results"]["depth"]
    assert r["finetuned"]["delta1"] > r["random"]["delta1"] + 0.1, r
    assert r["finetuned"]["rmse"] < r["random"]["rmse"] - 0.1, r
    assert r["constant"]["delta1"] < r["random"]["delta1"] - 0.1, r
