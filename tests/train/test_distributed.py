"""train/distributed.py: DDP and FSDP2 give the same training, and their state dicts are interchangeable.

The two-rank tests launch tests/train/dist_worker.py under torchrun (CPU, Gloo) once per method; it
trains 5 steps under DDP and under FSDP, saving the state after step 2, then resumes each state
under the other strategy. The one-process tests need no process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_worker import build
from launch import MAIN, cpu_args, torchrun
from torch import nn

from model import build_method
from pipeline.errors import CheckpointError, ConfigError
from tests.model.model_testing import TINY
from train.distributed import (
    DistConfig,
    clip_grad_norm,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    param_dtype,
    wrap_model,
)
from train.optim import build_optimizer
from train.recipes import load_config

WORKER = Path(__file__).with_name("dist_worker.py")
STEPS, SAVE_AT = 5, 2
METHODS = ("vicreg", "dinov2")


def _torchrun(out: Path, method: str) -> dict[str, dict]:
    # The reference kernels: the strategy is under test here, not the Triton interpreter.
    torchrun(
        WORKER,
        str(out),
        "--method",
        method,
        "--steps",
        str(STEPS),
        "--save-at",
        str(SAVE_AT),
        "--runs",
        "ddp",
        "fsdp",
        "ddp:fsdp",
        "fsdp:ddp",
        env={"EQRECON_KERNELS": "ref"},
    )
    names = ("ddp", "fsdp", "ddp-from-fsdp", "fsdp-from-ddp", "ddp-state", "fsdp-state")
    return {n: torch.load(out / f"{n}.pt", weights_only=False) for n in names}


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """method -> the worker's records, one torchrun launch per method for the whole module. Methods:
    vicreg (a BatchNorm expander) and the DINOv2 family with its EMA teacher, local crops (the
    encoder runs twice per step) and the path decoder."""
    cache: dict[str, dict[str, dict]] = {}

    def get(method: str) -> dict[str, dict]:
        if method not in cache:
            cache[method] = _torchrun(tmp_path_factory.mktemp(method), method)
        return cache[method]

    return get


def _close(got: list[float], want: list[float], what: str) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4, msg=what)


def _assert_states_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-3, atol=atol, msg=name)


# Parameters whose true gradient is zero (biases in front of BatchNorm; the final norm's bias, to
# which VICReg's shift-invariant terms are blind) move by AdamW's normalised rounding noise, up to lr
# per step in either direction, so final weights compare to STEPS x peak lr (5e-3 x 8 / 256).
WEIGHT_ATOL = STEPS * 5e-3 * 8 / 256


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_loss_curve_and_grad_norms_match_ddp(worker_runs, method):
    rec = worker_runs(method)
    assert len(rec["ddp"]["losses"]) == len(rec["fsdp"]["losses"]) == STEPS
    _close(rec["fsdp"]["losses"], rec["ddp"]["losses"], f"{method}: FSDP loss vs DDP")
    _close(rec["fsdp"]["grad_norms"], rec["ddp"]["grad_norms"], f"{method}: FSDP grad norm vs DDP")
    moved = [k for k, v in rec["fsdp"]["model"].items() if not torch.equal(v, rec["fsdp-state"]["model"][k])]
    assert (
        "encoder.backbone.blocks.1.attn.qkv.weight" in moved
        or "eq.encoder.backbone.blocks.1.attn.qkv.weight" in moved
    )
    _assert_states_close(rec["fsdp"]["model"], rec["ddp"]["model"], WEIGHT_ATOL)
    for strategy in ("ddp", "fsdp"):
        assert rec[strategy]["grad_mismatch"] == [], f"{strategy}: gradients on the wrong parameters"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_have_the_one_process_keys_and_full_tensors(worker_runs, method):
    rec = worker_runs(method)
    plain = {k: v.shape for k, v in build(method).state_dict().items()}  # one process, no wrapper
    ddp, fsdp = rec["ddp-state"], rec["fsdp-state"]
    for state in (ddp, fsdp):
        assert {k: v.shape for k, v in state["model"].items()} == plain
        assert all(v.device.type == "cpu" for v in state["model"].values())
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
    for name, state in ddp["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                fsdp["optimizer"]["state"][name][key], value, rtol=1e-3, atol=1e-6, msg=f"{name}.{key}"
            )
    assert fsdp["step"] == ddp["step"] == SAVE_AT and fsdp["scheduler"] == ddp["scheduler"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_state_saved_under_one_strategy_continues_under_the_other(worker_runs, method):
    rec = worker_runs(method)
    for resumed, straight in (("ddp-from-fsdp", "ddp"), ("fsdp-from-ddp", "fsdp")):
        _close(
            rec[resumed]["losses"], rec[straight]["losses"][SAVE_AT:], f"{method}: {resumed} vs {straight}"
        )
        _close(
            rec[resumed]["grad_norms"], rec[straight]["grad_norms"][SAVE_AT:], f"{method}: {resumed} norms"
        )
        _assert_states_close(rec[resumed]["model"], rec[straight]["model"], WEIGHT_ATOL)


def _teacher_pairs(state: dict) -> list[tuple[str, str]]:
    """(teacher key, the student key it follows): the DINO objective's teacher copies {encoder, head}."""
    prefix = "invariant.teacher.module."
    return [
        (k, k[len(prefix) :] if k.startswith(prefix + "encoder.") else "invariant." + k[len(prefix) :])
        for k in state
        if k.startswith(prefix)
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_ema_teacher_under_fsdp_is_sharded_like_the_student_and_equals_the_formula(worker_runs):
    rec = worker_runs("dinov2")
    for strategy in ("fsdp", "ddp"):
        ema = rec[strategy]["ema"]
        m, before, after = ema["momentum"], ema["before"], ema["after"]
        assert 0.5 < m < 0.95
        pairs = _teacher_pairs(after)
        assert len(pairs) > 20 and all(s in after for _, s in pairs)
        for teacher, student in pairs:
            torch.testing.assert_close(after[student], before[student], rtol=0, atol=0, msg=student)
            want = m * before[teacher] + (1 - m) * after[student]
            torch.testing.assert_close(
                after[teacher], want, rtol=1e-6, atol=1e-7, msg=f"{strategy}: {teacher}"
            )
        assert rec[strategy]["teacher_layout"] == [], rec[strategy]["teacher_layout"]
        assert rec[strategy]["teacher_sharded"] == (strategy == "fsdp")
        moved = [t for t, _ in pairs if not torch.equal(after[t], before[t])]
        assert len(moved) > len(pairs) // 2, "the update left the teacher where it was"
    _assert_states_close(rec["fsdp"]["ema"]["after"], rec["ddp"]["ema"]["after"], 1e-5)


@pytest.mark.integration
@pytest.mark.slow
def test_reconstruct_runs_on_every_rank_under_fsdp(worker_runs):
    rec = worker_runs("dinov2")
    want = rec["ddp"]["recon"]
    assert want is not None and want.dim() == 5
    torch.testing.assert_close(rec["fsdp"]["recon"], want, rtol=1e-3, atol=1e-3)


# --- one process ----------------------------------------------------------------------------------


@pytest.fixture
def tiny(one_thread):
    cfg = load_config("demo-vicreg", list(TINY))
    torch.manual_seed(0)
    return cfg, build_method(cfg.model, cfg.data)


def _one_step(cfg, method) -> torch.optim.Optimizer:
    optimizer = build_optimizer(cfg.optim, method, cfg.data.batch_size, torch.device("cpu"))
    for p in method.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as the loop leaves it (a loaded optimizer is built grad-free)
    return optimizer


def test_one_process_keeps_the_method_and_its_own_state_dict(tiny):
    cfg, method = tiny
    assert wrap_model(method, DistConfig(strategy="fsdp"), torch.device("cpu"), world_size=1) is method
    state = model_state_dict(method)
    want = method.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    torch.manual_seed(1)
    other = build_method(cfg.model, cfg.data)
    assert not torch.equal(other.state_dict()["encoder.head.weight"], want["encoder.head.weight"])
    load_model_state_dict(other, state)
    assert all(torch.equal(other.state_dict()[k], want[k]) for k in want)


def test_an_id_keyed_optimizer_state_is_refused_in_one_line(tiny):
    """optimizer.state_dict() numbers the parameters (eqrecon's checkpoints before 0.1.0's format):
    only state keyed by parameter name is read, and nothing is loaded from the numbered one."""
    cfg, method = tiny
    numbered = _one_step(cfg, method).state_dict()
    fresh = build_optimizer(cfg.optim, method, cfg.data.batch_size, torch.device("cpu"))
    with pytest.raises(CheckpointError) as err:
        load_optimizer_state_dict(method, fresh, numbered)
    assert str(err.value) == (
        "the checkpoint's optimizer state numbers the parameters instead of naming them "
        "(written by an eqrecon before 0.1.0's checkpoint format); start a new run"
    )
    assert not fresh.state


def test_a_state_of_another_model_is_a_checkpoint_error_naming_keys(tiny):
    _, method = tiny
    state = model_state_dict(method)
    state["encoder.extra.weight"] = state.pop("encoder.head.weight")
    state["encoder.head.bias"] = state["encoder.head.bias"][:3]
    with pytest.raises(
        CheckpointError,
        match=r"run/ckpt/last.pt does not fit.*missing encoder.head.weight.*"
        r"unexpected encoder.extra.weight, other shapes encoder.head.bias "
        r"\(3,\) \(this model: \(128,\)\)",
    ):
        load_model_state_dict(method, state, where="run/ckpt/last.pt")


def test_clip_grad_norm_returns_the_global_norm_and_clips(tiny):
    _, method = tiny
    params = list(method.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]).double()).float()
    torch.testing.assert_close(clip_grad_norm(params, 0.0), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        clip_grad_norm(params, 1.0), want, rtol=1e-5, atol=0
    )  # before clipping, as torch's
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(after, torch.tensor(1.0), rtol=1e-4, atol=1e-4)


def test_bad_dist_config_is_one_line_error():
    with pytest.raises(ConfigError, match=r"--dist.strategy=zero3 is not one of ddp, fsdp"):
        wrap_model(nn.Linear(2, 2), DistConfig(strategy="zero3"), torch.device("cpu"), 2)
    with pytest.raises(ConfigError, match=r"--dist.param_dtype=fp16 is not one of auto, bf16, fp32"):
        wrap_model(nn.Linear(2, 2), DistConfig(param_dtype="fp16"), torch.device("cpu"), 2)
    with pytest.raises(
        ConfigError, match=r"--dist.param_dtype=bf16 needs the bf16 autocast of --run.amp=bf16"
    ):
        wrap_model(nn.Linear(2, 2), DistConfig(strategy="fsdp", param_dtype="bf16"), torch.device("cpu"), 2)
    assert (
        param_dtype(DistConfig(), amp=True) == torch.bfloat16
        and param_dtype(DistConfig(), amp=False) == torch.float32
    )
    with pytest.raises(ConfigError, match=r"holds no timm.models.vision_transformer.Block"):
        wrap_model(nn.Linear(2, 2), DistConfig(strategy="fsdp"), torch.device("cpu"), 2)


# --- the trainer ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_main_trains_under_fsdp_and_resumes_under_ddp(tmp_path, demo_shards):
    """`torchrun train/main.py --dist.strategy=fsdp` on 2 CPU ranks: it trains, checkpoints, and a
    resume under DDP ends where a straight DDP run ends. demo-paper: the demo at a fixed λ (the balanced
    demo's λ controller measures with an extra backward that FSDP does not run, and is refused there)."""
    common = [
        *cpu_args("demo-paper"),
        "--data",
        str(demo_shards),
        "--data.batch_size=16",
        "--data.workers=1",
        "--optim.epochs=2",
        "--optim.warmup_epochs=1",
    ]
    ref = {"EQRECON_KERNELS": "ref"}
    torchrun(MAIN, *common, "--out", str(tmp_path / "straight"), env=ref)
    torchrun(MAIN, *common, "--out", str(tmp_path / "split"), "--steps", "3", "--dist.strategy=fsdp", env=ref)
    assert (tmp_path / "split" / "recon.png").exists()  # every rank ran the decoder, rank 0 wrote
    torchrun(MAIN, "--resume", str(tmp_path / "split" / "ckpt" / "last.pt"), "--dist.strategy=ddp", env=ref)
    a, b = (
        torch.load(tmp_path / run / "ckpt" / "last.pt", weights_only=False) for run in ("straight", "split")
    )
    assert a["step"] == b["step"] == 8 and b["config"]["dist"]["strategy"] == "ddp"
    # 8 steps at the demo's peak lr 5e-3 x 16 / 256 (see WEIGHT_ATOL).
    _assert_states_close(b["model"], a["model"], atol=8 * 5e-3 * 16 / 256)

    def losses(run: str) -> dict[int, float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows}

    straight, split = losses("straight"), losses("split")
    assert 3 in split and split.keys() - {3} == straight.keys()
    _close(
        [split[s] for s in sorted(straight)],
        [straight[s] for s in sorted(straight)],
        "resumed vs straight loss",
    )
