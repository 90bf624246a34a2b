"""bench/step.py measures the trainer's own step: phases add up, FLOPs are counted, the JSON is docs/DESIGN.md;
its defaults work on either device (synthetic batches on CUDA, the demo presets and shards on a CPU)."""

from __future__ import annotations

import json

import torch

from bench import _provenance, step


def test_one_preset_row_has_the_split_and_consistent_figures(demo_shards):
    rows = step.bench_preset(
        "demo-xattn",
        ["--data.img_size=32", f"--data.dir={demo_shards}"],
        ["synthetic", "loader"],
        torch.device("cpu"),
        warmup=1,
        steps=2,
        peak=1e11,
    )
    assert [(r["method"], r["source"]) for r in rows] == [("xattn", "synthetic"), ("xattn", "loader")]
    for r in rows:
        phases = r["data_ms"] + r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"]
        assert abs(phases - r["step_ms"]) < 1e-6 * r["step_ms"] + 1e-9
        assert r["samples_per_s"] == 16 / (r["step_ms"] / 1e3)
        assert r["flops_per_step"] > 1e8 and 0 < r["mfu"] < 10 and r["peak_mem_gb"] > 0.1
    assert rows[0]["data_ms"] < rows[1]["data_ms"]  # synthetic batches cost nothing to fetch


def test_defaults_per_device():
    args, overrides = step.parse([])
    presets, sources, steps, warmup, over = step.resolve_defaults(args, overrides, cuda=True)
    assert (steps, warmup) == (20, 5)
    # CUDA: vits16 at one GPU's batch, synthetic only (the demo photos cannot fill a batch of 256)
    assert (
        presets == list(step.GPU_PRESETS) and sources == ["synthetic"] and over == ["--data.batch_size=256"]
    )
    presets, sources, _, _, over = step.resolve_defaults(args, overrides, cuda=False)
    assert presets == list(step.CPU_PRESETS) and sources == ["synthetic", "loader"] and over == []
    args, overrides = step.parse(["--data", "/shards", "--data.batch_size=64"])
    _, sources, _, _, over = step.resolve_defaults(args, overrides, cuda=True)
    assert sources == ["synthetic", "loader"] and over == ["--data.batch_size=64", "--data.dir=/shards"]


def test_cpu_defaults_run_on_the_demo_and_write_one_result_per_preset(
    tmp_path, demo_shards, one_thread, monkeypatch
):
    # the CPU defaults (synthetic + the demo shards at the preset's own batch), shrunk to one step;
    # bench/results of the tree is left alone (its CPU figures are made on purpose)
    monkeypatch.setattr(_provenance, "RESULTS_DIR", tmp_path / "results")
    argv = [
        "--presets",
        "demo-vicreg",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--data.img_size=32",
        f"--data.dir={demo_shards}",
        "--out",
        str(tmp_path),
    ]
    assert step.main(argv) == 0
    per_preset = json.loads((tmp_path / "step-demo-vicreg-cpu.json").read_text())
    whole = json.loads((tmp_path / "step-cpu.json").read_text())
    assert [r["source"] for r in per_preset["rows"]] == ["synthetic", "loader"]
    assert per_preset["rows"] == whole["rows"] and whole["summary"]["samples_per_s.vicreg"] > 0
    assert per_preset["git_sha"] == whole["git_sha"] and "kernel_choices" in whole["config"]
    assert (tmp_path / "results" / "step-cpu.json").read_text() == (tmp_path / "step-cpu.json").read_text()
