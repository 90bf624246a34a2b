"""Two Gloo ranks under torchrun: DDP keeps every parameter identical across ranks, and it trains."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch import MAIN, cpu_args, start, torchrun

# Each rank runs train/main.py's own build + train (ddp_worker.py), then saves its parameters; the test
# compares ranks. (BatchNorm running stats are rank 0's, broadcast by DDP before each forward: on CPU,
# where SyncBatchNorm does not run, they differ after the last local forward, by design.)
HERE = Path(__file__).resolve().parent


@pytest.mark.integration
def test_two_gloo_ranks_stay_identical(tmp_path, demo_shards):
    run = tmp_path / "run"
    torchrun(
        HERE / "ddp_worker.py",
        str(tmp_path),
        *cpu_args(data=demo_shards, out=run, steps=2),
        "--data.batch_size=16",
        "--data.workers=1",
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["last"].keys() == r1["last"].keys()
    for name in r0["last"]:
        assert torch.equal(r0["first"][name], r1["first"][name]), f"{name} differs at init"
        assert torch.equal(r0["last"][name], r1["last"][name]), f"{name} differs across ranks after training"
    moved = [n for n in r0["last"] if not torch.equal(r0["first"][n], r0["last"][n])]
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in moved and "encoder.head.weight" in moved
    saved = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["world_size"] == 2 and len(saved["loader"]) == 2
    assert all(torch.equal(saved["model"][n], r0["last"][n]) for n in r0["last"])


@pytest.mark.integration
@pytest.mark.slow
def test_two_rank_stop_and_resume_equals_the_straight_run(tmp_path, demo_shards):
    """Per-rank loader positions and RNG states come back: the resumed 2-rank run ends bit-identical."""
    common = [
        *cpu_args(),
        "--data",
        str(demo_shards),
        "--data.batch_size=32",
        "--optim.epochs=3",
        "--optim.warmup_epochs=1",
    ]
    torchrun(MAIN, *common, "--out", str(tmp_path / "straight"))
    torchrun(MAIN, *common, "--out", str(tmp_path / "split"), "--steps", "3")
    torchrun(MAIN, "--resume", str(tmp_path / "split" / "ckpt" / "last.pt"))
    a, b = (
        torch.load(tmp_path / run / "ckpt" / "last.pt", weights_only=True) for run in ("straight", "split")
    )
    assert a["step"] == b["step"] == 6 and a["loader"] == b["loader"] and len(a["loader"]) == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


LONG = [
    *cpu_args(),
    "--data.batch_size=16",
    "--data.workers=1",
    "--optim.epochs=1000",
    "--run.log_every=1",
]  # far longer than any test waits


@pytest.mark.integration
@pytest.mark.slow
def test_an_error_on_rank_1_is_its_one_line_and_the_job_ends_at_once(tmp_path, demo_shards):
    proc = start(
        HERE / "rank_fault.py", "1", "3", *LONG, "--data", str(demo_shards), "--out", str(tmp_path / "run")
    )
    _, err = proc.communicate(timeout=600)
    ended = time.monotonic()
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: [rank 1] injected fault: rank 1's shard is damaged at batch 3", err[-3000:]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # rank 0 logged steps 1 and 2, then the job stopped
    # The job ended promptly after the fault (not after Gloo's 30-minute collective timeout).
    assert ended - (tmp_path / "run" / "metrics.jsonl").stat().st_mtime < 60


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
def test_workers_exit_when_their_torchrun_agent_is_killed(tmp_path, demo_shards):
    run = tmp_path / "run"
    agent = start(MAIN, *LONG, "--data", str(demo_shards), "--out", str(run), output=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(p) for p in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        assert len(workers) == 2
        agent.kill()  # kill -9: the agent cannot stop its workers
        agent.wait()
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), "workers kept training after their agent died"
    finally:
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                os.kill(pid, 9)
