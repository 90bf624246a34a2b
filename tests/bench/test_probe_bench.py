"""bench/probe.py: a small run writes the bench JSON (provenance, every row, the summary's ratio)."""

from __future__ import annotations

import json

import pytest

from bench import _provenance
from bench import probe as bench_probe


@pytest.mark.integration  # provenance runs git
def test_probe_bench_writes_rows_and_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(_provenance, "RESULTS_DIR", tmp_path / "results")
    argv = [
        "--images",
        "8",
        "--before-pairs",
        "40",
        "--after-pairs",
        "24",
        "--rows",
        "before,after",
        "--threads",
        "1",
    ]
    assert bench_probe.main([*argv, "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "results" / "probe-cpu.json").read_text())
    assert record["what"] == "probe" and record["git_sha"] and "torch" in record["versions"]
    before, after = record["rows"]
    assert (before["row"], after["row"]) == ("before", "after")
    # the old rule: >= 40 train pairs at 70 % of 8 images -> 8 per image; MLP, one mask, one pool, 3 parts
    assert (
        before["per_image"] == 8 and before["protocol"] == "fast" and before["parts"] == ["all", "inv", "eq"]
    )
    assert after["protocol"] == "ridge" and after["mask"] == "disc,none" and after["parts"] == ["all", "eq"]
    for row in (before, after):
        assert row["images_embedded"] > 0 and row["images_per_s"] > 0 and row["wall_s"] > 0
    s = record["summary"]
    assert s["speedup.after_vs_before"] == round(before["wall_s"] / after["wall_s"], 1)
    assert s["before_est_s"] == round(before["wall_s"] * 6, 1)
    assert (tmp_path / "out" / "probe-cpu.json").is_file()
