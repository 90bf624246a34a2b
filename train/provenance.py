"""Provenance of a run or a measurement: device, library versions, git SHA.

`provenance()` is what every run's config.json and every bench result JSON records, so a number can
be traced to the code and the machine that produced it. Where `.git` is absent (a tree copied to an
air-gapped node), the SHA is read from a `GIT_SHA` file at the repository root, written before the
copy (see bench/gpu_check.sh).
"""

from __future__ import annotations

import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_slug(device: torch.device | str | None = None) -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3' for a GPU, 'cpu' for any CPU."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def git_sha() -> str | None:
    """HEAD's SHA, suffixed '-dirty' when tracked code differs from it; None outside a checkout.

    bench/results/ is left out of the check: one bench rewriting its JSON must not mark the next
    bench of the same session as run on modified code.
    """
    root = ROOT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        recorded = root / "GIT_SHA"  # written before the tree was copied where .git does not travel
        return recorded.read_text().strip() or None if recorded.is_file() else None
    return sha + ("-dirty" if dirty else "")


def provenance(device: torch.device | str | None = None) -> dict:
    """Device name, versions of torch/triton/DALI/CUDA/Python, and the git SHA."""
    return {
        "device": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "dali": _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "git_sha": git_sha(),
    }
