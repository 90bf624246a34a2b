"""`--run.compile`: the policy (auto = on for CUDA, off on a CPU) and compiled training on the CPU
(inductor) giving the eager run's losses, on one process and on 2 Gloo ranks under DDP and FSDP2.

Tolerance: every logged loss term and the gradient norm of each of the 5 steps within rtol 1e-4
(atol 1e-5) of the eager run's. Inductor fuses and reorders fp32 reductions, so the two runs differ by
rounding, which Adam's first steps (normalised updates) carry forward; measured here: ~1e-6 relative.
A compiled graph that computed something else (a dropped term, a stale weight, a wrong gradient)
differs from the second step on by far more.
"""

from __future__ import annotations

import json

import pytest
import torch
from launch import MAIN, cpu_args, torchrun
from torch._dynamo.utils import counters

from pipeline.errors import ConfigError
from train.compile import enabled, is_compiled, wrap_compiled
from train.distributed import DistConfig
from train.main import main

# The VICReg demo preset at 32 px with one block: the smallest real method (inductor on 2 cores
# compiles for minutes per graph; the encoder, expander and loss are what it compiles here).
PRESET = "demo-vicreg"
TINY = ["--model.depth=1", "--run.log_every=1", "--run.diagnostics=false", "--data.workers=1"]
RTOL, ATOL = 1e-4, 1e-5


def _losses(run) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "grad_norm"} for r in rows]


def _assert_same_losses(compiled: list[dict], eager: list[dict]) -> None:
    assert len(compiled) == len(eager) == 5 and compiled[0].keys() == eager[0].keys()
    for step, (c, e) in enumerate(zip(compiled, eager), 1):
        for term in e:
            assert c[term] == pytest.approx(e[term], rel=RTOL, abs=ATOL), (step, term, c[term], e[term])
    # the runs trained: the losses moved (a frozen model would match trivially)
    assert len({round(r["loss"], 6) for r in eager}) > 1


def test_policy_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not enabled("auto", cpu) and enabled("true", cpu) and not enabled("false", cpu)
    assert enabled("auto", cuda) and not enabled("false", cuda)  # triton imports here
    with pytest.raises(ConfigError, match=r"--run.compile=yes is not one of auto, true, false"):
        enabled("yes", cpu)


def test_wrapping_compiles_in_place_and_keeps_the_state_dict_keys():
    method = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    keys = list(method.state_dict())
    eager = wrap_compiled(method, DistConfig(), "false", torch.device("cpu"), 1, amp=False)
    assert eager is method and not is_compiled(eager)
    model = wrap_compiled(method, DistConfig(), "true", torch.device("cpu"), 1, amp=False)
    assert model is method and is_compiled(model) and list(model.state_dict()) == keys


@pytest.mark.integration
def test_a_bad_value_is_one_error_line(tmp_path, demo_shards, capsys):
    argv = cpu_args(PRESET, demo_shards, tmp_path / "run", steps=1)
    assert main([*argv, *TINY, "--run.compile=maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --run.compile=maybe is not one of auto, true, false"), err


@pytest.mark.integration
def test_compiled_run_matches_the_eager_run(tmp_path, demo_shards):
    runs, graphs = {}, {}
    for choice in ("false", "true"):
        runs[choice] = tmp_path / choice
        argv = cpu_args(PRESET, demo_shards, runs[choice], steps=5)
        counters.clear()
        assert main([*argv, *TINY, f"--run.compile={choice}"]) == 0
        graphs[choice] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()  # free the compiled graphs for the rest of the session
    assert graphs["false"] == 0 and graphs["true"] >= 1  # the compiled run did compile
    _assert_same_losses(_losses(runs["true"]), _losses(runs["false"]))
    saved = [torch.load(runs[c] / "ckpt" / "last.pt", weights_only=True)["model"] for c in ("true", "false")]
    assert saved[0].keys() == saved[1].keys()  # in-place compile: no `_orig_mod.` in the checkpoint
    # Adam moves a weight by at most about lr per step, and parameters whose true gradient is zero (the
    # biases in front of a BatchNorm) move by normalised rounding noise: within 5 steps of the peak lr
    # (3.1e-4 here) of each other; the others agree to ~1e-6
    bound = 5 * 3.125e-4
    for name, value in saved[1].items():
        diff = (saved[0][name].float() - value.float()).abs().max().item()
        assert diff <= bound, (name, diff)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_two_gloo_ranks_match_eager(tmp_path, demo_shards, strategy):
    # DDP compiles its wrapper (DDPOptimizer splits the graph at bucket boundaries), FSDP2 each block
    # before fully_shard (train/compile.py). Inductor's cache goes to a folder per run: the compiled
    # run writes its kernels there, the eager one nothing.
    runs = {}
    for choice in ("false", "true"):
        runs[choice] = tmp_path / choice
        argv = [*cpu_args(PRESET, demo_shards, runs[choice], steps=5), *TINY, "--data.batch_size=16"]
        cache = tmp_path / f"inductor-{choice}"
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
        torchrun(MAIN, *argv, f"--dist.strategy={strategy}", f"--run.compile={choice}", env=env)
        assert any(cache.rglob("*.py")) == (choice == "true"), sorted(cache.rglob("*"))[:5]
    _assert_same_losses(_losses(runs["true"]), _losses(runs["false"]))
