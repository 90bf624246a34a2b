"""--steps N then --resume equals the uninterrupted run: same parameters, optimizer state and losses."""

from __future__ import annotations

import json

import pytest
import torch
from launch import cpu_args

from train.main import main

pytestmark = pytest.mark.integration  # every test here runs a training

# 64 demo photos in batches of 32: 2 steps per epoch; a 3-epoch schedule, stopped at step 3 (mid-epoch,
# mid-cosine), so the resume must restore the loader position, the schedule and the optimizer moments.
SMALL = [
    *cpu_args(),
    "--data.batch_size=32",
    "--optim.epochs=3",
    "--optim.warmup_epochs=1",
    "--run.ckpt_every=2",
    "--run.recon_every=2",
]


def metrics(run):
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_stop_and_resume_equals_the_straight_run(tmp_path, demo_shards):
    data = ["--data", str(demo_shards), "--run.log_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*SMALL, *data, "--out", str(straight)]) == 0
    assert main([*SMALL, *data, "--out", str(split), "--steps", "3"]) == 0
    assert torch.load(split / "ckpt" / "last.pt", weights_only=True)["step"] == 3
    assert main(["--resume", str(split / "ckpt" / "last.pt")]) == 0  # the saved config; runs to the end

    a = torch.load(straight / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(split / "ckpt" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"]
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for i, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            b["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-9
        )
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]

    ma, mb = metrics(straight), metrics(split)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4, 5, 6]
    for step in ma:
        assert mb[step]["lr"] == ma[step]["lr"]
        for term in ("loss", "loss/inv", "loss/eq"):
            assert abs(mb[step][term] - ma[step][term]) <= 1e-4 * abs(ma[step][term]), (step, term)
    assert ma[6]["loss"] != ma[1]["loss"]
    assert (split / "recon.png").is_file() and sorted(p.name for p in (split / "recon").iterdir()) == [
        "step-000002.png",
        "step-000003.png",
        "step-000004.png",
        "step-000006.png",
    ]


def test_a_fresh_run_refuses_a_folder_that_holds_one(tmp_path, demo_shards, capsys):
    args = [*SMALL, "--data", str(demo_shards), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run; continue it with --resume" in err and err.count("\n") == 1


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path, demo_shards, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*SMALL, "--data", str(demo_shards), "--out", str(blocker / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write the run folder {blocker / 'run'}" in err
