"""hubconf.py: torch.hub's local source returns the exported timm model (and the split head)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import ExportError
from train import export

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_hub_entry_point_returns_the_exported_model_and_head(trained):
    ckpt, folder = trained
    model = torch.hub.load(str(ROOT), "eqrecon_backbone", path=str(folder), source="local")
    same, head, d_inv = torch.hub.load(
        str(ROOT), "eqrecon_backbone", path=str(folder), with_head=True, source="local"
    )
    enc = export.load_method(ckpt)[0].encoder
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, split = model(x), enc(x)
        assert not model.training and torch.equal(feats, same(x))
        assert (head(feats)[:, :d_inv] - split.z_inv).abs().max() <= 1e-5
    assert d_inv == enc.d_inv


def test_hub_entry_point_on_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(ExportError, match="not an export folder"):
        torch.hub.load(str(ROOT), "eqrecon_backbone", path=str(tmp_path), source="local")


@pytest.mark.integration
def test_hub_load_from_a_fresh_python_elsewhere(trained, tmp_path):
    """As a user calls it: another folder, no PYTHONPATH; torch.hub alone makes the repository importable."""
    _, folder = trained
    code = (
        f"import torch; m = torch.hub.load({str(ROOT)!r}, 'eqrecon_backbone', path={str(folder)!r}, "
        f"source='local'); print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 192)"
