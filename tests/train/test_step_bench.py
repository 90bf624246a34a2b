"""bench/step.py measures the trainer's own step: its times agree with a clock outside it, FLOPs are
counted (forward and backward) as a hand count says, the JSON is docs/DESIGN.md;
its defaults work on either device (synthetic batches on CUDA, the demo presets and shards on a CPU); eager
and compiled side by side, compile time apart."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench import _provenance, step
from train.config import Config


@pytest.mark.integration  # the loader source starts the loader's workers
def test_one_preset_row_has_the_split_and_times_a_clock_outside_agrees_with(demo_shards):
    start = time.perf_counter()
    rows = step.bench_preset(
        "demo-xattn",
        ["--data.img_size=32", f"--data.dir={demo_shards}"],
        ["synthetic", "loader"],
        torch.device("cpu"),
        warmup=1,
        steps=2,
        peak=1e11,
    )
    assert [(r["method"], r["source"], r["mode"]) for r in rows] == [
        ("xattn", "synthetic", "eager"),
        ("xattn", "loader", "eager"),
    ]
    wall_ms = 1e3 * (time.perf_counter() - start)
    # The timed steps (2 per row) ran inside this call: they cannot add up to more than its wall time.
    assert 0 < sum(2 * r["step_ms"] for r in rows) <= wall_ms
    for r in rows:
        assert all(r[f"{p}_ms"] >= 0 for p in ("data", "forward", "backward", "optimizer"))
        assert r["flops_per_step"] > 1e8 and 0 < r["mfu"] < 10 and r["peak_mem_gb"] > 0.1
    assert rows[0]["data_ms"] < rows[1]["data_ms"]  # synthetic batches cost nothing to fetch


@pytest.mark.integration  # compiles a whole training step (inductor: minutes on 2 cores)
def test_eager_and_compiled_side_by_side_with_the_compile_time_apart(demo_shards, one_thread):
    tiny = ["--data.img_size=32", "--model.depth=1", f"--data.dir={demo_shards}"]
    modes = ("eager", "compiled")
    rows = step.bench_preset(
        "demo-vicreg", tiny, ["synthetic", "loader"], torch.device("cpu"), 1, 2, 1e11, modes
    )
    torch._dynamo.reset()
    # the loader source is timed eager only (its cost does not depend on the model)
    assert [(r["source"], r["mode"]) for r in rows] == [
        ("synthetic", "eager"),
        ("loader", "eager"),
        ("synthetic", "compiled"),
    ]
    eager, compiled = rows[0], rows[2]
    # compilation happens in the first warm-up step, reported apart from the timed steps: it costs
    # many timed steps (not a fixed number of seconds: inductor's cache, warm from an earlier test of
    # the same session, made it 0.9 s in CI's second lane)
    assert eager["compile_s"] is None and compiled["compile_s"] > 5 * compiled["step_ms"] / 1e3
    assert compiled["compile_s"] == compiled["first_step_s"] - compiled["step_ms"] / 1e3
    assert compiled["first_step_s"] > eager["first_step_s"]
    assert compiled["flops_per_step"] == eager["flops_per_step"] > 1e7
    summary = step.summarise(rows)
    ratio = summary["compiled_samples_per_s.vicreg"] / summary["samples_per_s.vicreg"]
    assert (
        summary["compile_speedup.vicreg"] == ratio
        and summary["samples_per_s.vicreg"] == eager["samples_per_s"]
    )
    assert summary["compile_s.vicreg"] == compiled["compile_s"] and summary["mfu.vicreg"] == eager["mfu"]


def test_a_bad_mode_is_one_error_line(capsys):
    assert step.main(["--modes", "eager,jit"]) == 2
    assert capsys.readouterr().err.strip() == "error: --modes 'eager,jit': choose from eager, compiled"


def test_defaults_per_device():
    args, overrides = step.parse([])
    assert args.modes == "eager,compiled"  # side by side unless asked otherwise
    presets, sources, steps, warmup, over = step.resolve_defaults(args, overrides, cuda=True)
    assert (steps, warmup) == (20, 5)
    # CUDA: vits16 at one GPU's batch, synthetic only (the demo photos cannot fill a batch of 256)
    assert (
        presets == list(step.GPU_PRESETS) and sources == ["synthetic"] and over == ["--data.batch_size=256"]
    )
    presets, sources, _, _, over = step.resolve_defaults(args, overrides, cuda=False)
    assert presets == list(step.CPU_PRESETS) and sources == ["synthetic", "loader"] and over == []
    args, overrides = step.parse(["--data", "/shards", "--data.batch_size=64"])
    _, sources, _, _, over = step.resolve_defaults(args, overrides, cuda=True)
    assert sources == ["synthetic", "loader"] and over == ["--data.batch_size=64", "--data.dir=/shards"]


@pytest.mark.integration  # the loader source starts the loader's workers
def test_cpu_defaults_run_on_the_demo_and_write_one_result_per_preset(
    tmp_path, demo_shards, one_thread, monkeypatch
):
    # the CPU defaults (synthetic + the demo shards at the preset's own batch), shrunk to one step;
    # bench/results of the tree is left alone (its CPU figures are made on purpose)
    monkeypatch.setattr(_provenance, "RESULTS_DIR", tmp_path / "results")
    argv = [
        "--presets",
        "demo-vicreg",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--modes",
        "eager",
        "--data.img_size=32",
        f"--data.dir={demo_shards}",
        "--out",
        str(tmp_path),
    ]
    assert step.main(argv) == 0
    per_preset = json.loads((tmp_path / "step-demo-vicreg-cpu.json").read_text())
    whole = json.loads((tmp_path / "step-cpu.json").read_text())
    assert [r["source"] for r in per_preset["rows"]] == ["synthetic", "loader"]
    assert per_preset["rows"] == whole["rows"] and whole["summary"]["samples_per_s.vicreg"] > 0
    assert per_preset["git_sha"] == whole["git_sha"] and "kernel_choices" in whole["config"]
    assert (tmp_path / "results" / "step-cpu.json").read_text() == (tmp_path / "step-cpu.json").read_text()


class _OneLinear(torch.nn.Module):
    """A "method" whose FLOPs are known by hand: loss = mean((x W^T)^2), x (B, I), W (O, I)."""

    teacher = None  # a method's interface (model/composed.py): no teacher, no forward arguments

    def __init__(self, i: int, o: int):
        super().__init__()
        self.lin = torch.nn.Linear(i, o, bias=False)

    def forward(self, x: torch.Tensor) -> dict:
        return {"loss": self.lin(x).pow(2).mean()}


def test_flops_count_the_forward_and_both_backward_matmuls():
    """2·B·I·O for the forward matmul and as much for the weight's gradient (x needs none): 4·B·I·O."""
    b, i, o = 8, 24, 40
    method = _OneLinear(i, o)
    flops = step.count_flops(method, torch.randn(b, i), Config(), torch.device("cpu"))
    assert flops == 2 * b * i * o * 2
    assert all(p.grad is None for p in method.parameters())  # the count leaves no gradient behind
