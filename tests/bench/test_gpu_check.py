"""bench/gpu_check.sh: parts in order, each in a time box cut from one deadline, each part's JSON and
log in OUTDIR as soon as it ends (also when its time box kills it), and a summary of what ran. Every
test runs the script in a subprocess: all are integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["env", "wheels", "parity", "kernels", "step", "pipeline", "gpu", "fp32"]


def _run(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _part(out: Path, name: str) -> dict:
    return json.loads((out / f"{PARTS.index(name):02d}-{name}.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_runs_every_part_and_leaves_its_files(tmp_path):
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    before = {p: p.read_bytes() for p in results}
    out = tmp_path / "out"
    done = _run(out, "--dry-run", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in PARTS:
        part = _part(out, name)
        assert part["dry_run"] and part["provenance"]["versions"]["torch"], part
        want = "skipped" if name == "wheels" else "ok"
        assert part["status"] == want, (
            part,
            (out / f"{PARTS.index(name):02d}-{name}.log").read_text()[-2000:] if want == "ok" else "",
        )
        if want == "ok":
            assert (out / f"{PARTS.index(name):02d}-{name}.log").is_file()
    for bench in (
        "kernels-cpu.json",
        "step-vits16-path-cpu.json",
        "step-vits16-vicreg-cpu.json",
        "pipeline-cpu.json",
    ):
        record = json.loads((out / bench).read_text())
        assert record["rows"] and "git_sha" in record, bench
    # the dry run's step part times eager only (the real one adds compiled: inductor on a CPU takes minutes)
    for bench in ("step-vits16-path-cpu.json", "step-vits16-vicreg-cpu.json"):
        record = json.loads((out / bench).read_text())
        assert record["config"]["modes"] == ["eager"] and {r["mode"] for r in record["rows"]} == {"eager"}
    kernels = json.loads((out / "kernels-cpu.json").read_text())["config"]
    assert kernels["preset"] == "demo-xattn-path" and kernels["xattn_shape_B_H_Nq_Nk_D"] == [
        1,
        3,
        128,
        128,
        32,
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == [p for p in PARTS if p != "wheels"]
    assert summary["skipped"] == {"wheels": "no --wheels folder given"}
    assert "wheels    skipped" in (out / "SUMMARY.txt").read_text()
    # a dry run's CPU figures go to OUTDIR, never over the tree's bench/results
    assert {p: p.read_bytes() for p in results} == before


@pytest.mark.integration
def test_a_part_killed_by_its_time_box_still_leaves_its_files(tmp_path):
    out = tmp_path / "out"
    done = _run(
        out,
        "--dry-run",
        "--only",
        "env,step,pipeline",
        "--part-budget",
        "step=2",
        "--part-budget",
        "pipeline=2",
    )
    assert done.returncode == 0, done.stderr
    step = _part(out, "step")
    assert step["status"] == "timeout" and step["time_box_s"] == 2 and step["exit_code"] in (124, 137)
    assert step["seconds"] < 2 + 5 + 3  # the box, the SIGKILL grace, the clock's own overhead
    assert (out / "04-step.log").is_file() and _part(out, "pipeline")["status"] == "timeout"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == ["env", "step", "pipeline"] and summary["skipped"] == {}


@pytest.mark.integration
def test_parts_past_the_deadline_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--dry-run", "--budget", "0", "--only", "env,kernels")
    assert done.returncode == 0, done.stderr
    for name in ("env", "kernels"):
        part = _part(out, name)
        assert part["status"] == "skipped" and part["reason"].startswith("deadline: "), part
    assert json.loads((out / "summary.json").read_text())["ran"] == []


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, match",
    [
        (["--part-budget", "nope=3"], "unknown part 'nope'"),
        (["--budget", "ten"], "is not a whole number"),
        (["--wheels", "/nonexistent"], "is not a folder"),
    ],
)
def test_bad_arguments_are_one_error_line(tmp_path, args, match):
    done = _run(tmp_path / "out", *args)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and match in done.stderr
