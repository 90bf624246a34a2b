"""A preemption signal during start-up (building the data and the model: long on ImageNet with DALI)
exits 75 with a `preempted:` line, as one during training does, so `until [ $rc -ne 75 ]` requeue
wrappers go on; there is nothing to save yet."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from launch import MAIN, ROOT, cpu_args, environment

from train.loop import PREEMPTED_EXIT
from train.runlog import RUN_LOCK


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_start_up_exits_with_the_preemption_code_and_a_line(tmp_path, demo_shards, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *cpu_args(data=demo_shards, out=run, steps=5)],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The run folder's lock is taken before the data and the model are built: start-up is under way.
    deadline = time.monotonic() + 300
    while not (run / RUN_LOCK).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"preempted: stopped by signal {sig.name} during start-up" in err and "--resume auto" in err
    assert not (run / "ckpt").exists() and not (run / "metrics.jsonl").exists()
