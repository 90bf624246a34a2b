"""Preemption: SIGTERM/SIGUSR1 finish the step, write a checkpoint and exit 75 on every rank at the
same step; `--resume auto` then continues to the same weights as a run that was never stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from launch import MAIN, cpu_args, start

from train import checkpoint
from train.loop import PREEMPTED_EXIT
from train.main import main

pytestmark = pytest.mark.integration  # every test here runs a whole training

# 64 photos in batches of 32: 2 steps per epoch; 10 epochs = 20 steps, long enough to be stopped early.
SMALL = [
    *cpu_args(),
    "--data.batch_size=32",
    "--optim.epochs=10",
    "--optim.warmup_epochs=1",
    "--run.recon_every=100",
    "--run.log_every=1",
    "--data.workers=1",
]


def when_training(run: Path, action) -> threading.Thread:
    """Call action() once the run has logged its first step."""

    def wait() -> None:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def last_weights(run: Path) -> dict:
    return torch.load(run / "ckpt" / "last.pt", weights_only=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_and_exits_with_the_preemption_code(tmp_path, demo_shards, sig, capsys):
    run, before = tmp_path / "run", signal.getsignal(sig)
    when_training(run, lambda: os.kill(os.getpid(), sig))
    assert main([*SMALL, "--data", str(demo_shards), "--out", str(run)]) == PREEMPTED_EXIT == 75
    state = checkpoint.read(run / "ckpt" / "last.pt")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= state["step"] < 20 and rows[-1]["step"] == state["step"]  # the step it was in, then stop
    err = capsys.readouterr().err
    assert f"preempted: stopped by signal {sig.name} after step {state['step']}" in err and "--resume" in err
    assert signal.getsignal(sig) == before  # the trainer's handler is gone once train() returns


@pytest.mark.slow
def test_resume_auto_after_preemption_ends_where_a_straight_run_ends(tmp_path, demo_shards):
    data = ["--data", str(demo_shards), "--optim.epochs=4"]  # 8 steps
    run, straight = tmp_path / "run", tmp_path / "straight"
    when_training(run, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main([*SMALL, *data, "--out", str(run), "--resume", "auto"]) == 75  # no checkpoint yet: a new run
    stopped_at = last_weights(run)["step"]
    assert main([*SMALL, *data, "--out", str(run), "--resume", "auto"]) == 0
    assert main([*SMALL, *data, "--out", str(straight)]) == 0
    a, b = last_weights(straight), last_weights(run)
    assert a["step"] == b["step"] == 8 > stopped_at
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = dict(
        item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
    )
    return int(env["RANK"])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
def test_sigusr1_to_one_of_two_ranks_stops_both_at_the_same_step_names_it_and_resume_auto_matches(
    tmp_path, demo_shards
):
    """Rank 0 learns of the signal through the all-reduce: its line names the signal and the rank."""
    common = [*SMALL, "--data", str(demo_shards), "--optim.epochs=4"]  # 8 steps
    run, straight = tmp_path / "run", tmp_path / "straight"
    agent = start(MAIN, *common, "--out", str(run))

    def signal_rank_1() -> None:
        workers = _children(agent.pid)
        os.kill(next(pid for pid in workers if _rank_of(pid) == 1), signal.SIGUSR1)

    when_training(run, signal_rank_1)
    _, err = agent.communicate(timeout=600)
    # torchrun itself exits 1 whenever a worker exits non-zero; its failure report carries the code.
    assert agent.returncode != 0 and re.search(r"exitcode\s*:\s*75", err), err[-3000:]
    assert re.search(r"preempted: \[rank 1\] stopped by signal SIGUSR1 after step \d", err), err[-3000:]
    assert re.search(r"preempted: \[rank 0\] stopped by signal SIGUSR1 to rank 1 after step \d", err), err[
        -3000:
    ]
    state = checkpoint.read(run / "ckpt" / "last.pt")
    assert 1 <= state["step"] < 8 and len(state["loader"]) == 2
    assert state["loader"][0]["batch"] == state["loader"][1]["batch"]  # both ranks stopped at one step

    for args in (["--out", str(run), "--resume", "auto"], ["--out", str(straight)]):
        proc = start(MAIN, *common, *args)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    a, b = last_weights(straight), last_weights(run)
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_reaches_the_workers_and_they_checkpoint(tmp_path, demo_shards):
    """What a cluster does: it signals the launcher, which forwards SIGTERM to its workers and gives
    them 30 s before SIGKILL. (torchrun's agent does not forward SIGUSR1: that signal kills it.)"""
    run = tmp_path / "run"
    agent = start(MAIN, *SMALL, "--data", str(demo_shards), "--out", str(run))
    when_training(run, lambda: agent.send_signal(signal.SIGTERM))
    _, err = agent.communicate(timeout=600)
    assert agent.returncode != 0  # the agent re-raises the signal it got
    assert "preempted: [rank 0] stopped by signal SIGTERM" in err, err[-3000:]
    assert "preempted: [rank 1] stopped by signal SIGTERM" in err
    assert 1 <= checkpoint.read(run / "ckpt" / "last.pt")["step"] < 20
