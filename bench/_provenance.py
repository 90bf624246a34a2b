"""Provenance for benchmark results: device, library versions, git SHA, and the result writer.

Every bench script ends with `write_result(what, config, rows, summary)`, which writes
`bench/results/<what>-<device-slug>.json` in the DESIGN §3 format.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
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


def write_result(
    what: str, config: dict, rows: list, summary: dict, device: torch.device | str | None = None
) -> Path:
    """Write bench/results/<what>-<device-slug>.json (DESIGN §3) and return its path.

    `device` is the device that was measured (default: CUDA when present, else CPU), so a CPU run
    on a GPU machine is still labelled 'cpu'.
    """
    record = {"what": what, **provenance(device), "config": config, "rows": rows, "summary": summary}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{what}-{device_slug(device)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
