"""The DINO family end to end in the trainer: the demo presets train on the reference loader's
multi-crop and log every term, the schedules (teacher temperatures, momentum, weight decay, layer-wise
lr decay) take their recipe values, the config rejects inconsistent multi-crop settings in one line,
and a two-rank run stopped and resumed ends bit-identical to the straight run (student, teacher,
centres)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from launch import MAIN, torchrun

from model import build_method
from model.diagnostics import diagnostics
from pipeline.errors import ConfigError
from train.loop import train_step
from train.main import main
from train.optim import build_optimizer
from train.recipes import load_config
from train.schedules import Schedules, build_scheduler, peak_lr

# 32 px global crops, 2 local crops of 16 px at patch 8, 16 images: 4 steps per epoch on the demo photos.
SMALL = [
    "--run.device=cpu",
    "--data.img_size=32",
    "--data.multicrop.global_size=32",
    "--data.multicrop.local_size=16",
    "--data.multicrop.n_local=2",
    "--data.batch_size=16",
    "--data.workers=1",
    "--optim.epochs=2",
    "--optim.warmup_epochs=1",
    "--run.log_every=1",
    "--data.loader=reference",
]
TERMS = {"demo-dino": ("dino",), "demo-ibot": ("dino", "ibot"), "demo-dinov2": ("dino", "ibot", "koleo")}


def metrics(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.integration
@pytest.mark.parametrize("preset", list(TERMS))
def test_demo_presets_train_log_every_term_and_checkpoint_the_teacher(preset, tmp_path, demo_shards):
    run = tmp_path / "run"
    assert (
        main(["--preset", preset, *SMALL, "--data", str(demo_shards), "--out", str(run), "--steps", "2"]) == 0
    )
    rows = metrics(run)
    assert sorted(rows) == [1, 2]
    want = {
        "loss",
        "loss/inv",
        "loss/eq",
        *(f"loss/inv.{t}" for t in TERMS[preset]),
        "sched/teacher_temp",
        "sched/patch_temp",
        "sched/momentum",
        "sched/weight_decay",
    }
    for row in rows.values():
        assert want <= row.keys() and all(math.isfinite(row[k]) for k in want), row
    assert not ({"loss/inv.ibot", "loss/inv.koleo"} - want) & rows[1].keys()  # only the family's own terms
    assert rows[1]["sched/teacher_temp"] == 0.04 < rows[2]["sched/teacher_temp"]  # warming up
    assert rows[1]["sched/weight_decay"] == pytest.approx(0.04) and rows[1][
        "sched/momentum"
    ] == pytest.approx(0.992 if preset == "demo-dinov2" else 0.996)
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("invariant.teacher.module.encoder.") for k in state)
    assert "invariant.center" in state and "invariant.patch_center" in state
    # the teacher moved by EMA, and not onto the student
    key = "encoder.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[f"invariant.teacher.module.{key}"], state[key])


def test_schedules_take_the_recipe_values():
    cfg = load_config("demo-dinov2")
    steps_per_epoch, total = 4, 300
    s = Schedules(cfg, steps_per_epoch, total)
    assert s.temperatures(0) == (0.04, 0.04)
    assert s.temperatures(30 * steps_per_epoch) == (0.07, 0.07) == s.temperatures(total)
    assert s.temperatures(15 * steps_per_epoch) == pytest.approx((0.055, 0.055))
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(total) == 1.0
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(total) == pytest.approx(0.4)
    assert s.weight_decay(total // 2) == pytest.approx(0.22)
    # DINOv2's sqrt rule: base 4e-3 at batch 2048 -> 4e-3 * sqrt(2)
    assert peak_lr(load_config("vitl16-dinov2").optim, 2048) == pytest.approx(4e-3 * math.sqrt(2))


@pytest.mark.integration
def test_the_prototype_layer_is_frozen_in_the_first_epoch_only(demo_shards):
    """DINO's cancel_gradients_last_layer: no update (nor Adam moments) of the prototype layer while
    step < freeze_last_layer_epochs x steps per epoch; everything else trains from step 0."""
    from pipeline import build_loader

    cfg = load_config("demo-dino", [*SMALL, f"--data.dir={demo_shards}"])
    assert cfg.optim.teacher.freeze_last_layer_epochs == 1.0
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.data)
    optimizer = build_optimizer(cfg.optim, method, cfg.data.batch_size, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.data.batch_size, 2)
    schedules = Schedules(cfg, 2, 10)  # 2 steps per epoch: steps 0 and 1 frozen
    batch = next(iter(build_loader(cfg.data, device="cpu")))
    prototypes = method.invariant.head.last_layer.parametrizations.weight.original1
    mlp = method.invariant.head.mlp[0].weight
    for step in range(3):
        before = prototypes.detach().clone(), mlp.detach().clone()
        terms = train_step(method, batch, optimizer, scheduler, step=step, clip_grad=3.0, schedules=schedules)
        frozen = step < 2
        assert torch.equal(prototypes, before[0]) == frozen, step
        assert not torch.equal(mlp, before[1]), step
        assert terms["sched/prototypes_frozen"] == float(frozen)
    assert int(optimizer.state[prototypes]["step"]) == 1 and int(optimizer.state[mlp]["step"]) == 3


@pytest.mark.integration
def test_a_resume_inside_the_frozen_epoch_equals_the_straight_run(tmp_path, demo_shards):
    """A checkpoint of the first epoch holds no optimizer state for the still frozen prototype layer;
    the resumed run creates it at the first update, as the straight run does."""
    common = ["--preset", "demo-dino", *SMALL, "--data", str(demo_shards)]  # 4 steps per epoch, 8 in all
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--steps", "3"]) == 0
    early = torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)
    assert not [n for n in early["optimizer"]["state"] if ".last_layer." in n]
    assert main(["--resume", str(tmp_path / "split" / "ckpt" / "last.pt")]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt" / "last.pt", weights_only=True) for r in ("straight", "split"))
    assert a["step"] == b["step"] == 8 and [n for n in b["optimizer"]["state"] if ".last_layer." in n]
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name


def test_layer_wise_lr_decay_and_the_patch_embed_scale():
    cfg = load_config(
        "demo-dinov2",
        ["--data.img_size=32", "--data.multicrop.global_size=32", "--data.multicrop.local_size=16"],
    )
    method = build_method(cfg.model, cfg.data)
    optimizer = build_optimizer(cfg.optim, method, cfg.data.batch_size, torch.device("cpu"))
    lr = peak_lr(cfg.optim, cfg.data.batch_size)
    scale = {id(p): g["lr"] / lr for g in optimizer.param_groups for p in g["params"]}
    vit, depth = method.encoder.backbone, len(method.encoder.backbone.blocks)  # 4 blocks
    assert scale[id(vit.blocks[depth - 1].attn.qkv.weight)] == pytest.approx(0.9)
    assert scale[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.9**depth)
    assert scale[id(vit.pos_embed)] == pytest.approx(0.9 ** (depth + 1))
    assert scale[id(method.encoder.mask_token)] == pytest.approx(0.9 ** (depth + 1))
    assert scale[id(vit.patch_embed.proj.weight)] == pytest.approx(0.2 * 0.9 ** (depth + 1))
    assert (
        scale[id(method.invariant.head.mlp[0].weight)] == 1.0 and scale[id(method.encoder.head.weight)] == 1.0
    )
    assert optimizer.param_groups[0]["lr"] == lr  # the logged lr is the unscaled one
    teacher = {id(p) for p in method.teacher.parameters()}
    assert not teacher & scale.keys()


@pytest.mark.integration
def test_diagnostics_leave_the_teacher_centres_alone(demo_shards):
    from pipeline import build_loader

    cfg = load_config("demo-ibot", [*SMALL, f"--data.dir={demo_shards}"])
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.data)
    batch = next(iter(build_loader(cfg.data, device="cpu")))
    assert batch.local.shape == (16, 2, 3, 16, 16) and batch.masks.shape == (16, 2, 16)
    method(batch, teacher_temp=(0.04, 0.04))  # the centres move off zero
    before = [b.clone() for b in method.buffers()]
    terms = diagnostics(method, batch, teacher_temp=(0.04, 0.04))
    assert math.isfinite(terms["diag/grad_ratio"]) and "diag/recon.own" in terms
    assert all(torch.equal(a, b) for a, b in zip(before, method.buffers()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.family=ibot"], "--model.family=ibot needs multi-crop: --data.multicrop.enabled=true"),
        (["--data.multicrop.enabled=true"], "--data.multicrop.enabled=true needs a DINO family"),
        (["--preset-ibot", "--data.multicrop.patch_size=16"], "must equal --model.patch_size=8"),
        (["--preset-ibot", "--data.img_size=32"], "the global crops are the views"),
    ],
)
def test_inconsistent_multicrop_settings_are_one_line(overrides, message):
    preset = "demo-ibot" if overrides[0] == "--preset-ibot" else "demo"
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    ):
        load_config(preset, [o for o in overrides if o != "--preset-ibot"])


def _torchrun(*args: str) -> None:
    torchrun(MAIN, *args, env={"EQRECON_KERNELS": "ref"})


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "strategy", "loader"), [("demo-ibot", "ddp", "dali"), ("demo-dinov2", "fsdp", "reference")]
)
def test_two_rank_stop_and_resume_is_bit_identical(tmp_path, demo_shards, preset, strategy, loader):
    """2 Gloo ranks: 3 steps + resume to 6 == 6 straight, bit for bit: student, teacher, centres,
    optimizer, loader (DALI's in-graph local crops too); the losses of every step too."""
    common = [
        "--preset",
        preset,
        "--device",
        "cpu",
        *SMALL,
        f"--data.loader={loader}",
        "--data",
        str(demo_shards),
        f"--dist.strategy={strategy}",
    ]
    _torchrun(*common, "--out", str(tmp_path / "straight"), "--steps", "6")
    _torchrun(*common, "--out", str(tmp_path / "split"), "--steps", "3")
    _torchrun("--resume", str(tmp_path / "split" / "ckpt" / "last.pt"), "--run.steps=6")
    a, b = (
        torch.load(tmp_path / run / "ckpt" / "last.pt", weights_only=True) for run in ("straight", "split")
    )
    assert a["step"] == b["step"] == 6 and a["loader"] == b["loader"] and a["scheduler"] == b["scheduler"]
    assert a["model"].keys() == b["model"].keys()
    assert {"invariant.center", "invariant.patch_center"} <= a["model"].keys()
    assert any(k.startswith("invariant.teacher.module.") for k in a["model"])
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4, 5, 6]
    for step in ma:
        assert {k: v for k, v in mb[step].items() if "time" not in k and "per_s" not in k} == {
            k: v for k, v in ma[step].items() if "time" not in k and "per_s" not in k
        }, step


@pytest.mark.integration
def test_the_step_bench_times_demo_ibot_with_its_crops_and_teacher(demo_shards):
    from bench import step

    small = [
        "--data.img_size=32",
        "--data.multicrop.global_size=32",
        "--data.multicrop.local_size=16",
        "--data.multicrop.n_local=2",
        f"--data.dir={demo_shards}",
        "--data.loader=reference",
    ]
    rows = step.bench_preset(
        "demo-ibot", small, ["synthetic", "loader"], torch.device("cpu"), warmup=1, steps=1, peak=1e11
    )
    assert [(r["method"], r["source"]) for r in rows] == [("ibot+path", "synthetic"), ("ibot+path", "loader")]
    batch = step.synthetic_batches(load_config("demo-ibot", small), torch.device("cpu"), n=1)[0]
    assert batch.local.shape == (16, 2, 3, 16, 16) and batch.masks.shape == (16, 2, 16) and batch.masks.any()
    assert all(r["flops_per_step"] > 0 and r["samples_per_s"] > 0 for r in rows)
