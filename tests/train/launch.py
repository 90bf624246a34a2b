"""The one way the multi-rank tests start torchrun: CPU ranks (Gloo) on this machine, one thread each,
the repository importable. `torchrun` waits and fails the test on a non-zero exit; `start` returns the
running agent for tests that signal it or its workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "train" / "main.py"


def command(script: Path, *args: str, nproc: int = 2) -> list[str]:
    """python -m torch.distributed.run --standalone --nproc_per_node=NPROC SCRIPT ARGS."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*run, str(script), *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def start(script: Path, *args: str, env: dict | None = None, output=subprocess.PIPE) -> subprocess.Popen:
    """The torchrun agent, running (text output on pipes unless `output` says otherwise)."""
    return subprocess.Popen(
        command(script, *args),
        cwd=ROOT,
        env=environment(**(env or {})),
        stdout=output,
        stderr=output,
        text=True,
    )


def torchrun(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to the end; a non-zero exit fails the test with the tail of torchrun's output."""
    proc = subprocess.run(
        command(script, *args),
        cwd=ROOT,
        env=environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
