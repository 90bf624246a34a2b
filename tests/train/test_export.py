"""train/export.py: timm's `local-dir:` loads the export strictly and computes the trained features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from launch import cpu_args
from safetensors.torch import load_file, save_file

from train import checkpoint, export
from train.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_run) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {pool: tiny_run(tmp / f"run-{pool}", f"--model.pool={pool}") for pool in ("mean", "cls")}


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("exported")
    return {pool: export.export(ckpt, tmp / f"backbone-{pool}") for pool, ckpt in ckpts.items()}


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.integration
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_timm_local_dir_gives_the_trained_features(ckpts, exported, pool):
    method, _ = export.load_method(ckpts[pool])
    enc = method.encoder
    model = timm.create_model(f"local-dir:{exported[pool]}", pretrained=True).eval()  # the user's call
    x = _images()
    with torch.no_grad():
        tokens = enc.forward_features(x)  # (B, prefix + N, D)
        want = tokens[:, enc.backbone.num_prefix_tokens :].mean(1) if pool == "mean" else tokens[:, 0]
        got = model(x)  # (B, D)
        assert got.shape == want.shape == (3, enc.embed_dim)
        assert (got - want).abs().max() <= 1e-5
        # The split head on top gives what the SSL loss and the equivariant objective saw.
        head, d_inv = export.load_split_head(exported[pool])
        z, split = head(got), enc(x)
    assert d_inv == enc.d_inv
    assert (z[:, :d_inv] - split.z_inv).abs().max() <= 1e-5
    assert (z[:, d_inv:] - split.z_eq_pooled).abs().max() <= 1e-5


@pytest.mark.integration
def test_resolve_data_config_gives_the_trained_transform(ckpts, exported):
    trained = checkpoint.read(ckpts["mean"])["config"]["data"]
    model = timm.create_model(f"local-dir:{exported['mean']}", pretrained=True)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32)  # not the architecture's 224
    assert tuple(cfg["mean"]) == tuple(trained["mean"]) and tuple(cfg["std"]) == tuple(trained["std"])
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 1.0)
    meta = json.loads((exported["mean"] / "config.json").read_text())["eqrecon"]
    assert (meta["method"], meta["step"], meta["head"]["file"]) == ("path", 1, "split_head.safetensors")


@pytest.mark.integration
@pytest.mark.parametrize("change", ["extra", "missing"])
def test_loading_is_strict(exported, tmp_path, change):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((exported["mean"] / "config.json").read_text())
    state = load_file(str(exported["mean"] / "model.safetensors"))
    if change == "extra":
        state["decoder.junk"] = torch.zeros(1)
    else:
        del state["blocks.0.mlp.fc2.bias"]
    save_file(state, str(bad / "model.safetensors"))
    key = "decoder.junk" if change == "extra" else "blocks.0.mlp.fc2.bias"
    with pytest.raises(RuntimeError, match=key):  # timm alone refuses it
        timm.create_model(f"local-dir:{bad}", pretrained=True)
    with pytest.raises(export.ExportError, match=f"weights do not match config.json .*{key}"):
        export.load_export(bad)


@pytest.mark.integration
def test_another_img_size_resamples_the_position_embedding(ckpts, tmp_path, capsys):
    assert (
        export.main(["--ckpt", str(ckpts["mean"]), "--out", str(tmp_path / "b48"), "--img-size", "48"]) == 0
    )
    model = export.load_export(tmp_path / "b48")
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 48, 48)
    assert model(_images(2, 48)).shape == (2, 192)
    assert (
        export.main(["--ckpt", str(ckpts["mean"]), "--out", str(tmp_path / "b30"), "--img-size", "30"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size 30: must be a positive multiple of the patch size 8" in err


def _one_line(capsys, *args: str) -> str:
    assert export.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _bad_checkpoint(tmp_path: Path, kind: str, good: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.integration
@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "no such checkpoint"),
        ("empty", "the file is empty"),
        ("garbage", "not a readable training checkpoint"),
        ("truncated", "not a readable training checkpoint"),
        ("foreign", "not an eqrecon training checkpoint"),
    ],
)
def test_a_bad_checkpoint_is_one_line(ckpts, tmp_path, capsys, kind, words):
    ckpt = _bad_checkpoint(tmp_path, kind, ckpts["mean"].resolve())
    err = _one_line(capsys, "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert words in err and str(ckpt) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_an_unwritable_destination_is_one_line(ckpts, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    err = _one_line(capsys, "--ckpt", str(ckpts["mean"]), "--out", str(tmp_path / "a-file" / "backbone"))
    assert "cannot write the export" in err and "a-file" in err
    err = _one_line(capsys, "--ckpt", str(ckpts["mean"]), "--out", str(tmp_path / "backbone.safetensors"))
    assert "an export is a folder now" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_destination_is_one_line(ckpts, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = _one_line(capsys, "--ckpt", str(ckpts["mean"]), "--out", str(locked / "backbone"))
    finally:
        locked.chmod(0o755)
    assert "cannot write the export" in err and "Permission denied" in err


@pytest.mark.integration
@pytest.mark.parametrize("name", ["model.safetensors", "split_head.safetensors", "config.json"])
def test_a_damaged_export_file_is_an_export_error(exported, tmp_path, name):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in exported["mean"].iterdir():
        data = f.read_bytes()
        (copy / f.name).write_bytes(data[: len(data) // 2] if f.name == name else data)
    with pytest.raises(export.ExportError, match="damaged"):
        export.load_export(copy)
        export.load_split_head(copy)


@pytest.mark.integration
def test_the_script_runs_from_anywhere(ckpts, tmp_path):
    out = tmp_path / "backbone"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "export.py"), "--ckpt", str(ckpts["cls"]), "--out", str(out)],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "split_head.safetensors",
    ]


# ------------------------------------------------------------------------- the DINO family's teacher


@pytest.fixture(scope="module")
def ibot_ckpt(tmp_path_factory, demo_shards) -> Path:
    """A real 2-step demo-ibot run at 32 px (the teacher has moved off its initial copy, not onto the student)."""
    run = tmp_path_factory.mktemp("ibot") / "run"
    assert (
        main(
            [
                *cpu_args("demo-ibot", data=demo_shards, out=run, steps=2),
                "--data.multicrop.global_size=32",
                "--data.multicrop.local_size=16",
                "--data.multicrop.n_local=2",
                "--model.depth=1",
                "--data.loader=reference",
            ]
        )
        == 0
    )
    return run / "ckpt" / "last.pt"


@pytest.mark.parametrize("weights", ["auto", "teacher", "student"])
def test_the_dino_family_exports_its_teacher_by_default(ibot_ckpt, tmp_path, weights):
    out = export.export(ibot_ckpt, tmp_path / "backbone", weights=weights)
    state = torch.load(ibot_ckpt, weights_only=True)["model"]
    prefix = "encoder." if weights == "student" else "invariant.teacher.module.encoder."
    saved, head = load_file(out / "model.safetensors"), load_file(out / "split_head.safetensors")
    assert saved.keys() == {
        k[len(prefix) + len("backbone.") :] for k in state if k.startswith(prefix + "backbone.")
    }
    for name, value in saved.items():
        assert torch.equal(value, state[f"{prefix}backbone.{name}"]), name
    assert torch.equal(head["weight"], state[f"{prefix}head.weight"])
    assert not torch.equal(
        state["invariant.teacher.module.encoder.head.weight"], state["encoder.head.weight"]
    )
    meta = json.loads((out / "config.json").read_text())["eqrecon"]
    assert meta["weights"] == ("student" if weights == "student" else "teacher") and meta["family"] == "ibot"


@pytest.mark.integration
def test_a_teacher_export_of_a_method_without_one_is_one_line(ckpts, tmp_path, capsys):
    code = export.main(["--ckpt", str(ckpts["mean"]), "--out", str(tmp_path / "b"), "--weights", "teacher"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no teacher" in err and "--weights student" in err


def test_the_equivariance_probe_runs_on_an_exported_teacher(ibot_ckpt, tmp_path, demo_shards):
    from train import probe

    out = export.export(ibot_ckpt, tmp_path / "backbone")
    result = tmp_path / "eq.json"
    assert (
        probe.main(
            [
                "equivariance",
                "--backbone",
                str(out),
                "--data",
                str(demo_shards),
                "--split",
                "val",
                "--transforms",
                "rotation",
                "--samples",
                "2",
                "--hidden",
                "16",
                "--epochs",
                "2",
                "--seeds",
                "0",
                "--pairs",
                "20",
                "--no-baselines",
                "--quiet",
                "--device",
                "cpu",
                "--out",
                str(result),
            ]
        )
        == 0
    )
    record = json.loads(result.read_text())
    assert record["what"] == "probe-equivariance" and "rotation" in json.dumps(record["results"])
