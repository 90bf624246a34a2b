"""train/export.py: timm loads the exported backbone exactly and computes the trained encoder's features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from train import export
from train.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shards):
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(["--preset", "demo", "--device", "cpu", "--data", str(demo_shards), "--out", str(run),
                 "--steps", "2", "--data.img_size=32"]) == 0
    out = run / "backbone.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "export.py"), "--ckpt", str(run / "ckpt" / "last.pt"),
                           "--out", str(out), "--with-head"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    method, _ = export.load_method(run / "ckpt" / "last.pt")
    return method, out


def test_timm_loads_the_export_strictly_and_reproduces_the_features(trained):
    method, out = trained
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["timm_name"] == "vit_tiny_patch16_224" and meta["method"] == "path" and meta["step"] == 2
    assert meta["timm_kwargs"] == {"img_size": 32, "patch_size": 8, "depth": 4}
    # The call from the docs, as a user writes it.
    model = timm.create_model(meta["timm_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(out)}, **meta["timm_kwargs"]).eval()
    saved = load_file(str(out))
    got = model.state_dict()
    assert set(saved) == set(got)  # nothing missing, nothing unexpected
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    # And with num_classes=0 in the overlay too, timm's own strict load accepts it.
    export.create_from_export(out, strict_overlay=True)

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.encoder.forward_features(x)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), model.forward_head(expected, pre_logits=True), rtol=0, atol=1e-6)
    assert not torch.equal(expected, timm.create_model(meta["timm_name"], num_classes=0,
                                                       **meta["timm_kwargs"]).eval().forward_features(x))


def test_the_head_file_reproduces_the_split(trained):
    method, out = trained
    meta = json.loads(out.with_suffix(".json").read_text())["head"]
    head = load_file(str(out.with_name(meta["file"])))
    assert head["weight"].shape == (meta["d_patch"], method.encoder.embed_dim)
    assert (meta["d_inv"], meta["d_eq"]) == (method.encoder.d_inv, method.encoder.d_eq)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = method.encoder.forward_features(x)[:, method.encoder.backbone.num_prefix_tokens:]
        z = tokens @ head["weight"].T + head["bias"]  # (B, N, d_patch)
        split = method.encoder(x)
    torch.testing.assert_close(z[..., meta["d_inv"]:], split.z_eq, rtol=0, atol=1e-5)
    torch.testing.assert_close(z[..., :meta["d_inv"]].mean(1), split.z_inv, rtol=0, atol=1e-5)


def test_strict_loading_would_catch_a_stray_key(trained, tmp_path):
    _, out = trained
    bad = tmp_path / "bad.safetensors"
    save_file({**load_file(str(out)), "decoder.junk": torch.zeros(1)}, str(bad))
    bad.with_suffix(".json").write_text(out.with_suffix(".json").read_text())
    with pytest.raises(RuntimeError, match="decoder.junk"):
        export.create_from_export(bad, strict_overlay=True)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert export.main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such checkpoint" in err
