"""bench/step.py measures the trainer's own step: phases add up, FLOPs are counted, the JSON is DESIGN §3."""

from __future__ import annotations

import torch

from bench import step


def test_one_preset_row_has_the_split_and_consistent_figures(demo_shards):
    rows = step.bench_preset("demo-xattn", ["--data.img_size=32", f"--data.dir={demo_shards}"],
                             ["synthetic", "loader"], torch.device("cpu"), warmup=1, steps=2, peak=1e11)
    assert [(r["method"], r["source"]) for r in rows] == [("xattn", "synthetic"), ("xattn", "loader")]
    for r in rows:
        phases = r["data_ms"] + r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"]
        assert abs(phases - r["step_ms"]) < 1e-6 * r["step_ms"] + 1e-9
        assert r["samples_per_s"] == 16 / (r["step_ms"] / 1e3)
        assert r["flops_per_step"] > 1e8 and 0 < r["mfu"] < 10 and r["peak_mem_gb"] > 0.1
    assert rows[0]["data_ms"] < rows[1]["data_ms"]  # synthetic batches cost nothing to fetch
