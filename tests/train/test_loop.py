"""train.loop's parts: the lr schedule, weight-decay groups, optimizer choice, the non-finite stop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from model import build_method
from pipeline import build_loader
from pipeline.errors import ConfigError
from train.config import OptimConfig
from train.loop import NonFiniteLoss, train_step
from train.optim import build_optimizer, param_groups
from train.recipes import load_config
from train.schedules import build_scheduler, lr_factor


def test_lr_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    cfg = OptimConfig(base_lr=1e-3, min_lr=1e-5, epochs=10, warmup_epochs=2)
    batch, per_epoch = 512, 5  # peak lr = 1e-3 * 512 / 256
    peak = 2e-3
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, cfg, batch, per_epoch)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([peak * (i + 1) / 10 for i in range(10)])  # 2 epochs of warm-up
    assert lrs[10] == pytest.approx(peak)
    assert lrs[30] == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lr_factor(cfg, batch, per_epoch)(50) * peak == pytest.approx(1e-5)  # the schedule's end
    assert lr_factor(cfg, batch, per_epoch)(500) * peak == pytest.approx(1e-5)  # and after it


def test_weight_decay_skips_biases_norms_and_tokens():
    method = build_method(load_config("demo").model, load_config("demo").data)
    decay, no_decay = param_groups(method, 0.05)
    names = {id(p): n for n, p in method.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(exempt) and decayed | exempt == set(names.values())
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in decayed and "encoder.head.weight" in decayed
    for name in (
        "encoder.backbone.pos_embed",
        "encoder.backbone.cls_token",
        "encoder.backbone.blocks.0.norm1.weight",
        "encoder.backbone.blocks.0.attn.qkv.bias",
        "encoder.head.bias",
    ):
        assert name in exempt
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_models_without_their_own_rule_decay_linear_and_conv_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4), nn.Embedding(5, 4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape, model[3].weight.shape]
    assert len(no_decay["params"]) == 5  # conv bias, norm weight and bias, embedding, linear bias


def test_adamw_lr_scales_with_batch_and_apex_is_a_clear_error_when_missing():
    model = nn.Linear(2, 2)
    opt = build_optimizer(OptimConfig(base_lr=1e-4), model, 2048, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(8e-4)
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--optim.name=apex_lamb needs NVIDIA apex"):
            build_optimizer(OptimConfig(name="apex_lamb"), model, 256, torch.device("cpu"))


@pytest.fixture(scope="module")
def demo_batch(demo_shards):
    cfg = load_config("demo", [f"--data.dir={demo_shards}", "--data.loader=reference", "--data.workers=1"])
    return cfg, next(iter(build_loader(cfg.data, 0, 1, "cpu")))


def test_a_non_finite_term_stops_before_the_weights_change_and_is_named(demo_batch):
    cfg, batch = demo_batch
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.data)
    opt = build_optimizer(cfg.optim, method, cfg.data.batch_size, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.optim, cfg.data.batch_size, 4)
    terms = train_step(method, batch, opt, sched, step=0, clip_grad=3.0)
    assert all(math.isfinite(v) for v in terms.values()) and {
        "loss",
        "loss/inv",
        "loss/eq",
        "grad_norm",
    } <= set(terms)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    batch.targets[0, 0, 0, 0, 0] = float("nan")  # only the reconstruction term sees it
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss/eq = nan at step 8 \(") as err:
        train_step(method, batch, opt, sched, step=7, clip_grad=3.0)
    assert "\n" not in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in method.named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_in_bf16_with_fused_adamw(tmp_path, demo_shards):
    import json

    from train.main import main

    model = nn.Linear(4, 4).cuda()
    assert build_optimizer(OptimConfig(), model, 256, torch.device("cuda")).defaults["fused"] is True
    run = tmp_path / "run"
    assert (
        main(
            [
                "--preset",
                "demo",
                "--device",
                "cuda",
                "--data",
                str(demo_shards),
                "--out",
                str(run),
                "--steps",
                "4",
                "--run.log_every=1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((run / "config.json").read_text())["device"] == "cuda:0"
