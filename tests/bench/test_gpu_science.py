"""bench/gpu_science.sh: the GPU science run as one time-boxed job; its --dry-run runs the same
sequence (train, probe, report, archive) on the CPU, and bad arguments are one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import science

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_science.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_gpu_job_size_is_the_issue_s_three_methods_at_112_px():
    size = science.SIZES["gpu-job"]
    assert list(size.methods) == ["vicreg", "path", "xattn"] and size.img_size == 112
    assert size.device == "cuda" and size.seeds == (0,) and not size.linear


@pytest.mark.integration
def test_dry_run_trains_probes_reports_and_archives_at_most_8_files(tmp_path):
    results = sorted((ROOT / "bench" / "results").glob("*"))
    before = {p: p.stat().st_mtime_ns for p in results}
    out = tmp_path / "out"
    done = _run(str(out), "--dry-run", "--budget", "800")
    assert done.returncode == 0, (
        done.stdout[-2000:] + done.stderr[-2000:] + (out / "job.log").read_text()[-3000:]
    )
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"status.json", "job.log", "science.json", "runs.tar.gz"} <= set(files), files
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "ok" and status["dry_run"] is True and status["exit_code"] == 0
    record = json.loads((out / "science.json").read_text())
    summary = record["summary"]
    for method in ("vicreg", "path", "xattn"):
        assert -1 < summary[f"r2.{method}.rotation"] <= 1
    assert {"diff.path.rotation", "r2.random.rotation", "r2.pixels.rotation"} <= set(summary)
    assert all(
        row.get("peak_lr") == pytest.approx(1e-3) for row in record["rows"] if row.get("probe") == "timing"
    )
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/path-s0/probe.json" in names and not any("/ckpt" in n for n in names)
    assert {p: p.stat().st_mtime_ns for p in results} == before  # the tree's results are untouched


@pytest.mark.integration
def test_missing_data_and_bad_budget_are_one_error_line(tmp_path):
    done = _run(str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.startswith("error: --data PACK.tar is required")
    done = _run(str(tmp_path / "out"), "--dry-run", "--budget", "8m")
    assert done.returncode == 2 and done.stderr.strip() == "error: --budget takes whole seconds, got '8m'"
