"""`--run.tensorboard=true`: the same scalars as metrics.jsonl, and the recon grid as an image."""

from __future__ import annotations

import json

import pytest
from launch import cpu_args

from train.main import main


@pytest.mark.integration
def test_tensorboard_gets_every_metric_and_the_recon_grid(tmp_path, demo_shards):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert (
        main(
            [
                *cpu_args(data=demo_shards, out=run, steps=3),
                "--run.log_every=1",
                "--run.recon_every=2",
                "--run.tensorboard=true",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for tag in ("loss", "loss/inv", "loss/eq", "lr", "grad_norm"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(row["step"], pytest.approx(row[tag], rel=1e-6)) for row in rows], tag
    assert [e.step for e in events.Images("recon")] == [2, 3]
    assert events.Images("recon")[0].width > 32
