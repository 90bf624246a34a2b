"""The run folder: one training at a time writes it (its lock names the holder), a write that fails
mid-run (a full disk: /dev/full gives the kernel's ENOSPC) is one `error:` line, and a resume drops the
metrics rows of the steps it redoes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from launch import MAIN, ROOT, cpu_args, environment

from pipeline.errors import TrainingError
from train.distributed import Env
from train.main import main
from train.recipes import load_config
from train.runlog import RUN_LOCK, RunLog, drop_rows_after, lock_run_folder

FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk
needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- one training per folder ------------------------------------------------------------------------


def test_a_training_into_a_locked_run_folder_exits_at_once_naming_the_holder(tmp_path, demo_shards, capsys):
    run = tmp_path / "run"
    with lock_run_folder(run, Env()):  # this process holds it, as a running training does
        assert main(cpu_args(data=demo_shards, out=run, steps=1)) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{run} is being written by another training (pid {os.getpid()} on " in line and "--out" in line
    assert not (run / "metrics.jsonl").exists() and not (run / "ckpt").exists()


def test_the_run_folder_lock_is_free_again_after_the_holder(tmp_path):
    run = tmp_path / "run"
    with lock_run_folder(run, Env()):
        assert (run / RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    with lock_run_folder(run, Env()):  # released: taken again at once
        pass


@pytest.mark.integration
@pytest.mark.slow
def test_two_trainings_started_at_once_into_one_folder_one_runs_one_is_refused(tmp_path, demo_shards):
    run = tmp_path / "run"
    argv = [
        sys.executable,
        str(MAIN),
        *cpu_args(data=demo_shards, out=run, steps=3),
        "--model.depth=1",
        "--run.log_every=1",
    ]
    procs = [
        subprocess.Popen(
            argv, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    [line] = error_lines(refused)
    assert f"{run} is being written by another training (pid {winner.pid} on " in line
    assert [r["step"] for r in rows(run)] == [1, 2, 3]  # one schedule, not two interleaved


# --- a write that fails mid-run ---------------------------------------------------------------------


@pytest.mark.integration  # RunLog reads the git SHA (a subprocess)
@needs_dev_full
def test_a_metrics_row_that_cannot_be_written_is_one_training_error(tmp_path):
    cfg, run = load_config("demo"), tmp_path / "run"
    log = RunLog(run, cfg, Env(), 0, 10)
    log.step(1, 0, 1e-3, {"loss": 1.0}, 0.1, 0.01, write=True)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(FULL)  # the disk is full now
    with pytest.raises(
        TrainingError, match="cannot write the metrics log .*No space left on device.*--resume"
    ):
        log.step(2, 0, 1e-3, {"loss": 1.0}, 0.1, 0.01, write=True)
    log.close()


@pytest.mark.integration
@needs_dev_full
def test_a_disk_that_fills_mid_training_is_one_line(tmp_path, demo_shards, capsys):
    run = tmp_path / "run"

    def fill_the_disk() -> None:  # after the first row: the next append meets a full disk
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        (run / "full").symlink_to(FULL)
        os.replace(run / "full", run / "metrics.jsonl")

    thread = threading.Thread(target=fill_the_disk, daemon=True)
    thread.start()
    args = [*cpu_args(data=demo_shards, out=run, steps=40), "--model.depth=1", "--run.log_every=1"]
    assert main([*args, "--run.recon_every=100", "--run.ckpt_every=100"]) == 1
    thread.join()
    [line] = error_lines(capsys.readouterr().err)
    assert f"cannot write the metrics log {run / 'metrics.jsonl'}: No space left on device" in line


@pytest.mark.integration
@needs_dev_full
def test_a_reconstruction_grid_that_cannot_be_written_is_one_line(tmp_path, demo_shards, capsys):
    run = tmp_path / "run"
    (run / "recon").mkdir(parents=True)
    (run / "recon" / "step-000001.png").symlink_to(FULL)
    assert (
        main([*cpu_args(data=demo_shards, out=run, steps=2), "--model.depth=1", "--run.recon_every=1"]) == 1
    )
    [line] = error_lines(capsys.readouterr().err)
    assert f"cannot write the reconstruction grid {run / 'recon' / 'step-000001.png'}" in line
    assert "No space left on device" in line


# --- resume -----------------------------------------------------------------------------------------


def test_drop_rows_after_keeps_the_rows_up_to_the_step_and_drops_a_torn_one(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo'
    )
    drop_rows_after(metrics, 4)
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines())] == [1, 2, 3, 4]
    drop_rows_after(metrics, 4)  # nothing past it: left as is
    drop_rows_after(tmp_path / "none.jsonl", 4)  # no log yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.integration
def test_a_resume_from_an_older_checkpoint_drops_the_rows_it_redoes(tmp_path, demo_shards):
    run = tmp_path / "run"
    common = [*cpu_args(data=demo_shards, out=run), "--model.depth=1", "--run.log_every=1"]
    assert main([*common, "--steps", "4", "--run.ckpt_every=2", "--run.keep_ckpts=5"]) == 0
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    assert main([*common, "--steps", "5", "--resume", str(run / "ckpt" / "step-000002.pt")]) == 0
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5]  # steps 3 and 4 once: the resumed run's
