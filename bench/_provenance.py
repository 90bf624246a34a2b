"""The bench result writer: `write_result(what, config, rows, summary, out=DIR)` writes
`bench/results/<what>-<device-slug>.json` (the bench JSON format of docs/DESIGN.md) with provenance,
and the same file into DIR when given (every bench's `--out`: a job's output folder, which is what
comes back from a cluster node when the source tree does not).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from train.provenance import device_slug, provenance

# EQRECON_RESULTS_DIR moves it (bench/gpu_check.sh --dry-run: CPU figures must not overwrite the tree's)
RESULTS_DIR = Path(os.environ.get("EQRECON_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def write_result(
    what: str,
    config: dict,
    rows: list,
    summary: dict,
    device: torch.device | str | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write bench/results/<what>-<device-slug>.json (docs/DESIGN.md) and return its path; copy it into
    the folder `out` too when given.

    `device` is the device that was measured (default: CUDA when present, else CPU), so a CPU run
    on a GPU machine is still labelled 'cpu'.
    """
    record = {"what": what, **provenance(device), "config": config, "rows": rows, "summary": summary}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{what}-{device_slug(device)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out) / path.name)
    return path
