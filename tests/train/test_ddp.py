"""Two Gloo ranks under torchrun: DDP keeps every parameter identical across ranks, and it trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# Each rank runs train/main.py's own build + train, then saves its parameters; the test compares ranks.
# (BatchNorm running stats are rank 0's, broadcast by DDP before each forward: on CPU, where
# SyncBatchNorm does not run, they differ after the last local forward, by design.)
WORKER = """
import sys
import pytest
import torch
from train.loop import train, unwrap
from train.main import build, init_distributed, parse_config, resolve_data

out, argv = sys.argv[1], sys.argv[2:]
cfg = parse_config(argv)
env = init_distributed(cfg.run.device)
resolve_data(cfg, env)
model, optimizer, scheduler, loader = build(cfg, env)
first = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
train(cfg, model, optimizer, scheduler, loader, env)
last = {k: v.detach() for k, v in unwrap(model).named_parameters()}
torch.save({"first": first, "last": last}, f"{out}/rank{env.rank}.pt")
"""


def test_two_gloo_ranks_stay_identical(tmp_path, demo_shards):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), "--preset", "demo", "--device", "cpu", "--data", str(demo_shards), "--out", str(run),
           "--steps", "2", "--data.img_size=32", "--data.batch_size=16", "--data.workers=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["last"].keys() == r1["last"].keys()
    for name in r0["last"]:
        assert torch.equal(r0["first"][name], r1["first"][name]), f"{name} differs at init"
        assert torch.equal(r0["last"][name], r1["last"][name]), f"{name} differs across ranks after training"
    moved = [n for n in r0["last"] if not torch.equal(r0["first"][n], r0["last"][n])]
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in moved and "encoder.head.weight" in moved
    saved = torch.load(run / "ckpt" / "last.pt", weights_only=False)
    assert saved["step"] == 2 and saved["world_size"] == 2 and len(saved["loader"]) == 2
    assert all(torch.equal(saved["model"][n], r0["last"][n]) for n in r0["last"])


@pytest.mark.slow
def test_two_rank_stop_and_resume_equals_the_straight_run(tmp_path, demo_shards):
    """Per-rank loader positions and RNG states come back: the resumed 2-rank run ends bit-identical."""
    common = ["--preset", "demo", "--device", "cpu", "--data", str(demo_shards), "--data.img_size=32",
              "--data.batch_size=32", "--optim.epochs=3", "--optim.warmup_epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train" / "main.py"), *args]
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(*common, "--out", str(tmp_path / "straight"))
    torchrun(*common, "--out", str(tmp_path / "split"), "--steps", "3")
    torchrun("--resume", str(tmp_path / "split" / "ckpt" / "last.pt"))
    a, b = (torch.load(tmp_path / run / "ckpt" / "last.pt", weights_only=False) for run in ("straight", "split"))
    assert a["step"] == b["step"] == 6 and a["loader"] == b["loader"] and len(a["loader"]) == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
