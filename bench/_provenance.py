"""The bench result writer: `write_result(what, config, rows, summary)` writes
`bench/results/<what>-<device-slug>.json` (the bench JSON format of docs/DESIGN.md) with provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.provenance import device_name, device_slug, git_sha, provenance  # noqa: F401 (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
