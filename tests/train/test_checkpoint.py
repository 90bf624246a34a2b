"""Training checkpoints: weights_only loading, legacy files, validation before anything starts, the
run folder a resume writes to, and a write that fails (full disk, read-only folder)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import cpu_args

from train import checkpoint
from train.main import main

ROOT = Path(__file__).resolve().parents[2]
# 64 demo photos in batches of 32: 2 steps per epoch, 6 steps in all; a checkpoint every 2 steps.
SMALL = [
    *cpu_args(),
    "--data.batch_size=32",
    "--optim.epochs=3",
    "--optim.warmup_epochs=1",
    "--run.ckpt_every=2",
    "--run.recon_every=100",
    "--run.log_every=1",
]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, demo_shards) -> Path:
    """A run stopped after step 4 (checkpoints at steps 2 and 4); tests copy it before changing it."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main([*SMALL, "--data", str(demo_shards), "--out", str(run), "--steps", "4"]) == 0
    return run


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)
    state = torch.load(dst / "ckpt" / "last.pt", weights_only=True)
    state["run_dir"] = str(dst.resolve())  # the copy is its own run
    torch.save(state, dst / "ckpt" / "step-000004.pt")
    return dst


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_checkpoints_load_with_weights_only_and_name_their_format(stopped_run):
    state = torch.load(stopped_run / "ckpt" / "last.pt", weights_only=True)
    assert state["format"] == checkpoint.FORMAT and state["step"] == 4 and state["world_size"] == 1
    assert state["run_dir"] == str(stopped_run.resolve())
    assert isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)
    assert sorted(p.name for p in (stopped_run / "ckpt").iterdir()) == [
        "last.pt",
        "step-000002.pt",
        "step-000004.pt",
    ]


def test_rng_state_round_trips_every_generator():
    state = checkpoint.rng_state()
    expected = (np.random.rand(3), torch.rand(3), __import__("random").random())
    np.random.seed(1), torch.manual_seed(1)
    checkpoint.set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


def test_a_legacy_checkpoint_with_numpy_rng_still_resumes_to_the_same_weights(stopped_run, tmp_path):
    """Before the format key, checkpoints pickled numpy's RNG tuple: weights_only refuses them, and the
    resume path still reads them (numpy's array types allowed, nothing else)."""
    state = torch.load(stopped_run / "ckpt" / "last.pt", weights_only=True)
    for rng in state["rng"]:
        key = rng["numpy"]
        rng["numpy"] = (
            "MT19937",
            key["key"].numpy().astype(np.uint32),
            key["pos"],
            key["has_gauss"],
            key["gauss"],
        )
    for new_key in ("format", "version", "run_dir"):
        del state[new_key]
    legacy = tmp_path / "legacy" / "ckpt" / "step-000004.pt"
    legacy.parent.mkdir(parents=True)
    torch.save(state, legacy)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(legacy, weights_only=True)

    assert main(["--resume", str(legacy), "--out", str(tmp_path / "from-legacy")]) == 0
    assert main(["--resume", str(stopped_run / "ckpt" / "last.pt"), "--out", str(tmp_path / "from-new")]) == 0
    a, b = (
        torch.load(tmp_path / run / "ckpt" / "last.pt", weights_only=True)
        for run in ("from-legacy", "from-new")
    )
    assert a["step"] == b["step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", ["no such checkpoint"]),
        ("empty", ["the file is empty"]),
        ("truncated", ["not a readable training checkpoint, truncated"]),
        ("text", ["not a readable training checkpoint"]),
        ("foreign", ["not an eqrecon training checkpoint (keys weights)"]),
    ],
)
def test_a_bad_resume_file_is_one_line_naming_it(stopped_run, tmp_path, damage, words, capsys):
    bad = tmp_path / "bad.pt"
    good = (stopped_run / "ckpt" / "last.pt").read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "text":
        bad.write_text("not a checkpoint\n")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, bad)
    assert main(["--resume", str(bad)]) == 2
    line = error_line(capsys)
    assert f"--resume {bad}" in line, line
    for word in words:
        assert word in line


def test_resume_with_another_architecture_names_the_first_mismatching_key(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text()
    assert main(["--resume", str(run / "ckpt" / "last.pt"), "--model.depth=6"]) == 2
    line = error_line(capsys)
    assert "encoder.backbone.blocks.4." in line and "the checkpoint has no" in line and "architecture" in line
    assert (run / "metrics.jsonl").read_text() == rows  # refused before anything ran

    assert main(["--resume", str(run / "ckpt" / "last.pt"), "--model.d_patch=96", "--model.d_inv=32"]) == 2
    line = error_line(capsys)
    assert "encoder.head.weight has shape (128, 192) in the checkpoint but (96, 192)" in line, line


def test_resume_writes_into_the_original_run_folder_not_beside_a_copy(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    elsewhere = tmp_path / "home" / "mine.pt"
    elsewhere.parent.mkdir()
    shutil.copy(run / "ckpt" / "last.pt", elsewhere)
    assert main(["--resume", str(elsewhere), "--steps", "5"]) == 0
    assert torch.load(run / "ckpt" / "last.pt", weights_only=True)["step"] == 5  # the original run went on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # nothing beside the copy
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["mine.pt"]


def test_out_with_resume_is_honoured(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    before = (run / "ckpt" / "last.pt").resolve().read_bytes()
    assert main(["--resume", str(run / "ckpt" / "last.pt"), "--out", str(tmp_path / "branch")]) == 0
    assert torch.load(tmp_path / "branch" / "ckpt" / "last.pt", weights_only=True)["step"] == 6
    assert (run / "ckpt" / "last.pt").resolve().read_bytes() == before
    saved = json.loads((tmp_path / "branch" / "config.json").read_text())["config"]
    assert saved["run"]["out"] == str(tmp_path / "branch")


def test_resume_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    (run / "ckpt" / "step-000004.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.warns(RuntimeWarning, match="skipping .*step-000004.pt"):
        path, state = checkpoint.newest(run)
    assert path.name == "step-000002.pt" and state["step"] == 2
    assert checkpoint.newest(tmp_path / "no-run") is None


def _limit_file_size(limit: int):
    def preexec() -> None:
        # Writes past the limit fail with EFBIG, as writes to a full disk fail with ENOSPC (the
        # default action of SIGXFSZ would kill the process instead).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(stopped_run, tmp_path):
    """A file-size limit below the checkpoint's size: the same OSError path as a full disk."""
    run = copy_run(stopped_run, tmp_path / "run")
    size = (run / "ckpt" / "step-000004.pt").stat().st_size
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "main.py"),
            "--resume",
            str(run / "ckpt" / "last.pt"),
            "--steps",
            "5",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(size // 2),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot write the checkpoint {run / 'ckpt' / 'step-000005.pt'}" in errors[0]
    assert "File too large" in errors[0] and "resume from" in errors[0]
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["last.pt", "step-000002.pt", "step-000004.pt"]
    assert checkpoint.read(run / "ckpt" / "last.pt")["step"] == 4


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only folders (the file-size test covers it)"
)
def test_a_read_only_run_folder_is_one_line(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    (run / "ckpt").chmod(0o555)
    try:
        assert main(["--resume", str(run / "ckpt" / "last.pt"), "--steps", "5"]) == 2
    finally:
        (run / "ckpt").chmod(0o755)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write the checkpoint" in errors[0]
    assert checkpoint.read(run / "ckpt" / "last.pt")["step"] == 4


def test_resume_with_another_number_of_ranks_says_how_many(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    state["world_size"] = 2
    torch.save(state, run / "ckpt" / "step-000004.pt")
    assert main(["--resume", str(run / "ckpt" / "last.pt")]) == 2
    assert "written by 2 ranks but this run has 1: resume with --nproc_per_node=2" in error_line(capsys)


def test_a_bad_kernel_switch_is_one_line(stopped_run, tmp_path, monkeypatch, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    monkeypatch.setenv("EQRECON_KERNELS", "cuda-graphs")
    assert main(["--resume", str(run / "ckpt" / "last.pt")]) == 2
    assert "EQRECON_KERNELS='cuda-graphs'" in error_line(capsys)
