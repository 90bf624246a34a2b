"""A run folder that turns read-only mid-training: the next metrics.jsonl append is one `error:` line
(the full-disk twin is in test_runfolder.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from launch import MAIN, ROOT, cpu_args, environment


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: root writes through them."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_folder_turned_read_only_mid_training_is_one_line(tmp_path, demo_shards):
    run = tmp_path / "run"
    args = [*cpu_args(data=demo_shards, out=run, steps=200), "--model.depth=1", "--run.log_every=1"]
    proc = subprocess.Popen(
        [
            *unprivileged(),
            sys.executable,
            str(MAIN),
            *args,
            "--run.recon_every=1000",
            "--run.ckpt_every=1000",
        ],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        (run / "metrics.jsonl").chmod(0o444)
        run.chmod(0o555)
        _, err = proc.communicate(timeout=300)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"cannot write the metrics log {run / 'metrics.jsonl'}: Permission denied" in line
    assert "--resume auto" in line
