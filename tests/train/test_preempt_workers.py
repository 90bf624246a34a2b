"""Preemption with the reference loader's DataLoader workers: torchrun's agent and Slurm signal the
whole process group, workers included. The workers ignore the stop signals (the main process decides
when to stop), so the run still checkpoints and exits 75 every time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch import MAIN, ROOT, command, cpu_args, environment
from test_preempt import when_training

from pipeline import build_loader
from train import checkpoint
from train.recipes import load_config

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc"
)


def children(pid: int) -> set[int]:
    return {
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    }


@pytest.mark.integration  # a DataLoader worker process
@needs_proc
def test_a_reference_loader_worker_outlives_the_stop_signals_and_the_epoch_completes(demo_shards):
    cfg = load_config("demo", ["--data.loader=reference", "--data.workers=1", "--data.img_size=32"]).data
    cfg.dir, cfg.batch_size = str(demo_shards), 4  # 16 batches: the worker is still reading when signalled
    loader = build_loader(cfg, device="cpu")
    before = children(os.getpid())
    it = iter(loader)
    batches = [next(it)]
    [worker] = children(os.getpid()) - before
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(worker, sig)
    time.sleep(0.5)
    batches += list(it)  # a worker that died would end this with "DataLoader worker ... exited unexpectedly"
    assert len(batches) == len(loader) == 16


# 64 photos in per-rank batches of 4 on 2 ranks: 8 steps per epoch, 10 epochs; stopped early.
REFERENCE = [
    *cpu_args(),
    "--model.depth=1",
    "--data.loader=reference",
    "--data.workers=1",
    "--data.batch_size=8",
    "--optim.epochs=10",
    "--optim.warmup_epochs=1",
    "--run.log_every=1",
    "--run.recon_every=1000",
]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("target", ["agent", "process group", "agent again"])
def test_sigterm_to_a_two_rank_reference_loader_run_always_checkpoints(tmp_path, demo_shards, target):
    """What a cluster does: SIGTERM to torchrun's agent (which signals each worker's process group) or
    to the job's whole process group. Before the fix, 4 runs in 5 lost the checkpoint."""
    run = tmp_path / "run"
    agent = subprocess.Popen(
        command(MAIN, *REFERENCE, "--data", str(demo_shards), "--out", str(run)),
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a batch job's
    )
    if target == "process group":
        when_training(run, lambda: os.killpg(agent.pid, signal.SIGTERM))
    else:
        when_training(run, lambda: agent.send_signal(signal.SIGTERM))
    _, err = agent.communicate(timeout=600)
    assert agent.returncode != 0, err[-3000:]
    for rank in (0, 1):
        assert re.search(rf"preempted: \[rank {rank}\] stopped by signal SIGTERM after step \d+", err), err[
            -3000:
        ]
    for symptom in ("ConnectionResetError", "EOFError", "exited unexpectedly", "BrokenPipeError"):
        assert symptom not in err, err[-3000:]
    state = checkpoint.read(run / "ckpt" / "last.pt")
    assert 1 <= state["step"] < 80 and state["loader"][0]["batch"] == state["loader"][1]["batch"]
