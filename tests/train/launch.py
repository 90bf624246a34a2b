"""How the train tests start runs. `cpu_args` begins every small run's argv (a preset on CPU at
32 px). The multi-rank tests start torchrun one way: CPU ranks (Gloo) on this machine, one thread each,
the repository importable; `torchrun` waits and fails the test on a non-zero exit, `start` returns the
running agent for tests that signal it or its workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "train" / "main.py"


def cpu_args(
    preset: str = "demo", data: Path | None = None, out: Path | None = None, steps: int = 0
) -> list[str]:
    """The start of a small run's argv: `preset` on CPU at 32 px, reading `data`, writing `out`, for
    `steps` steps (those given; each test adds what it varies)."""
    args = ["--preset", preset, "--device", "cpu", "--data.img_size=32"]
    args += ["--data", str(data)] if data else []
    args += ["--out", str(out)] if out else []
    return args + (["--steps", str(steps)] if steps else [])


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
