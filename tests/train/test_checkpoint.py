"""Training checkpoints through train/main.py: weights_only loading, validation before anything
starts, the run folder a resume writes to, step files past 999,999, optimizer overrides on resume,
damaged or cut files, and a write that fails (full disk, read-only folder). Files from before
0.1.0's checkpoint format are refused: tests/train/test_checkpoint_files.py."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from launch import cpu_args

from train import checkpoint
from train.config import from_dict
from train.main import main
from train.schedules import lr_factor, peak_lr

pytestmark = pytest.mark.integration  # every test here trains or resumes a run (the fixture's)

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
    """As `cp -r`: last.pt stays a link to its neighbour; the copy is its own run (it holds ckpt/)."""
    shutil.copytree(run, dst, symlinks=True)
    return dst


def rewrite(path: Path, state: dict) -> None:
    """Save an edited checkpoint with its checksum recorded again, as eqrecon's save would."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    torch.save({**state, "checksum": checkpoint.digest(state)}, path)


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


def test_resume_continues_in_the_folder_that_holds_the_checkpoint(stopped_run, tmp_path):
    """`cp -r RUN COPY` then --resume COPY/ckpt/last.pt: COPY goes on, RUN (recorded inside the
    checkpoint) is left as it was; a moved run goes on where it now is, not at its old path."""
    run = copy_run(stopped_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / "ckpt").iterdir()] if p.is_file()}
    copy = copy_run(run, tmp_path / "copy")
    assert main(["--resume", str(copy / "ckpt" / "last.pt"), "--steps", "5"]) == 0
    assert checkpoint.read(copy / "ckpt" / "last.pt")["step"] == 5
    assert json.loads((copy / "config.json").read_text())["config"]["run"]["out"] == str(copy.resolve())
    after = {p.name: p.read_bytes() for p in [*run.iterdir(), *(run / "ckpt").iterdir()] if p.is_file()}
    assert after == before and os.readlink(run / "ckpt" / "last.pt") == "step-000004.pt"

    moved = tmp_path / "moved"
    copy.rename(moved)
    assert main(["--resume", str(moved / "ckpt" / "last.pt"), "--steps", "6"]) == 0
    assert checkpoint.read(moved / "ckpt" / "last.pt")["step"] == 6
    assert not copy.exists()  # not recreated at the path recorded in the checkpoint


def test_a_checkpoint_outside_a_run_folder_resumes_only_with_out(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    elsewhere = tmp_path / "home" / "mine.pt"
    elsewhere.parent.mkdir()
    shutil.copy(run / "ckpt" / "last.pt", elsewhere)
    assert main(["--resume", str(elsewhere), "--steps", "5"]) == 2
    line = error_line(capsys)
    assert f"--resume {elsewhere} is not inside a run folder's ckpt/; pass --out DIR" in line, line
    assert checkpoint.read(run / "ckpt" / "last.pt")["step"] == 4  # the run it came from is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # nothing beside the copy
    assert main(["--resume", str(elsewhere), "--steps", "5", "--out", str(tmp_path / "branch")]) == 0
    assert checkpoint.read(tmp_path / "branch" / "ckpt" / "last.pt")["step"] == 5
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


def metrics(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_run_past_step_999999_keeps_its_newest_checkpoints_and_resumes_from_them(stopped_run, tmp_path):
    """Step 4's checkpoint moved to steps 999,996 and 999,998 of a 600,000-epoch schedule (2 steps an
    epoch); the run goes on across step 1,000,000, where names gain a digit, and is resumed there."""
    run = copy_run(stopped_run, tmp_path / "run")
    state = torch.load(run / "ckpt" / "step-000004.pt", weights_only=True)
    for old in (run / "ckpt").iterdir():
        old.unlink()
    for step in (999_996, 999_998):
        epoch = step // 2 - 1  # the checkpoint sits at the end of that epoch, as step 4's at epoch 1's
        moved = {**state, "step": step, "epoch": epoch}
        moved["loader"] = [{**position, "epoch": epoch} for position in state["loader"]]
        moved["scheduler"] = {**state["scheduler"], "last_epoch": step, "_step_count": step + 1}
        moved["config"] = {**state["config"], "optim": {**state["config"]["optim"], "epochs": 600_000.0}}
        rewrite(run / "ckpt" / f"step-{step:06d}.pt", moved)
    (run / "ckpt" / "last.pt").symlink_to("step-999998.pt")

    assert main(["--resume", "auto", "--out", str(run), "--steps", "1000002"]) == 0
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
        "last.pt",
        "step-1000000.pt",
        "step-1000002.pt",
    ]
    assert os.readlink(run / "ckpt" / "last.pt") == "step-1000002.pt"
    assert checkpoint.newest(run)[1]["step"] == 1_000_002
    assert main(["--resume", "auto", "--out", str(run), "--steps", "1000004"]) == 0
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
        "last.pt",
        "step-1000002.pt",
        "step-1000004.pt",
    ]
    assert checkpoint.read(run / "ckpt" / "last.pt")["step"] == 1_000_004
    assert [s for s in metrics(run) if s > 4] == [
        999_999,
        1_000_000,
        1_000_001,
        1_000_002,
        1_000_003,
        1_000_004,
    ]


def test_an_optimizer_override_on_resume_is_applied_from_the_next_step_and_said(
    stopped_run, tmp_path, capsys
):
    """The run used base_lr 0.005, betas 0.9,0.999, weight decay 0.05: the resumed steps use the new
    values (lr = the new config's schedule), which config.json and the next checkpoint record."""
    run = copy_run(stopped_run, tmp_path / "run")
    new = ["--optim.base_lr=0.003", "--optim.betas=0.8,0.99", "--optim.weight_decay=0.1"]
    capsys.readouterr()
    assert main(["--resume", str(run / "ckpt" / "last.pt"), *new]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "--optim." in line]
    assert said == [
        f"--resume {run / 'ckpt' / 'last.pt'}: from step 5 on --optim.base_lr=0.003 (was 0.005), "
        + "--optim.weight_decay=0.1 (was 0.05), --optim.betas=0.8,0.99 (was 0.9,0.999) (the optimizer's "
        + "moments and step come from the checkpoint)"
    ], said
    last = checkpoint.read(run / "ckpt" / "last.pt")
    optim = from_dict(last["config"]).optim
    assert (optim.base_lr, optim.betas, optim.weight_decay) == (0.003, (0.8, 0.99), 0.1)
    assert json.loads((run / "config.json").read_text())["config"]["optim"]["base_lr"] == 0.003
    peak, factor = peak_lr(optim, 32), lr_factor(optim, 32, 2)
    rows = metrics(run)
    for step in (5, 6):  # the lr a step uses is the schedule's at the steps taken before it
        assert rows[step]["lr"] == pytest.approx(peak * factor(step - 1), rel=1e-6), step
    assert rows[4]["lr"] == metrics(stopped_run)[4]["lr"] != pytest.approx(peak * factor(3), rel=1e-3)
    assert last["scheduler"]["base_lrs"] == [peak, peak]
    decay, exempt = last["optimizer"]["param_groups"]
    assert decay["betas"] == exempt["betas"] == (0.8, 0.99)
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)


def test_an_override_that_regroups_the_optimizer_is_one_line_before_anything_runs(
    stopped_run, tmp_path, capsys
):
    run = copy_run(stopped_run, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text()
    assert main(["--resume", str(run / "ckpt" / "last.pt"), "--optim.layer_decay=0.9"]) == 2
    line = error_line(capsys)
    assert "optimizer groups other than the checkpoint's 2" in line and "--optim.layer_decay" in line, line
    assert (run / "metrics.jsonl").read_text() == rows


@pytest.mark.parametrize("damage", ["bytes", "cut"])
def test_a_damaged_or_cut_newest_checkpoint_is_one_line_and_auto_resumes_the_one_before(
    stopped_run, tmp_path, damage, capsys
):
    """64 bytes of a tensor flipped inside an intact zip, or the file cut to 8 kB (torch: OSError)."""
    run = copy_run(stopped_run, tmp_path / "run")
    newest = run / "ckpt" / "step-000004.pt"
    raw = bytearray(newest.read_bytes())
    if damage == "bytes":
        with zipfile.ZipFile(newest) as z:
            record = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
        # Past the local header (30 bytes, the name, the extra field that aligns the data) to mid-record.
        name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26 : record.header_offset + 30])
        start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        raw[start : start + 64] = bytes(b ^ 0x5A for b in raw[start : start + 64])
        newest.write_bytes(bytes(raw))
        torch.load(newest, weights_only=True)  # torch reads it without complaint
    else:
        newest.write_bytes(bytes(raw[:8192]))
    capsys.readouterr()
    assert main(["--resume", str(run / "ckpt" / "last.pt")]) == 2
    line = error_line(capsys)
    assert ("damaged: its contents differ" if damage == "bytes" else "truncated") in line, line
    with pytest.warns(RuntimeWarning, match="skipping .*step-000004.pt"):
        assert main(["--resume", "auto", "--out", str(run), "--steps", "3"]) == 0
    assert checkpoint.read(run / "ckpt" / "last.pt")["step"] == 3


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
    rewrite(run / "ckpt" / "step-000004.pt", state)
    assert main(["--resume", str(run / "ckpt" / "last.pt")]) == 2
    assert "written by 2 ranks but this run has 1: resume with --nproc_per_node=2" in error_line(capsys)


def test_a_bad_kernel_switch_is_one_line(stopped_run, tmp_path, monkeypatch, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    monkeypatch.setenv("EQRECON_KERNELS", "cuda-graphs")
    assert main(["--resume", str(run / "ckpt" / "last.pt")]) == 2
    assert "EQRECON_KERNELS='cuda-graphs'" in error_line(capsys)
