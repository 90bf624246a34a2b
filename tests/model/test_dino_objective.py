"""The DINO family as build_method composes it (model/dino_objective.py) on random tensors: the encoder's
masked / other-size token path equals its timm path, every family with every equivariant part gives
finite logged terms, every trainable parameter gets a gradient and the
teacher none, the centres and the teacher move, a checkpoint restores them, two DDP ranks stay
identical, and a batch without masks is a one-line error."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_testing import make_batch, variant_config

from model import build_method
from model.composed import Composed
from model.config import DinoConfig
from model.dino_objective import DinoObjective
from pipeline import masks as ibot_masks
from pipeline.batch import Batch
from pipeline.errors import ConfigError

LOCAL, LOCAL_SIZE = 3, 16  # local crops per image at 16 px (a 2×2 grid at patch 8)
# (family, equivariant part, model_testing variant, extra overrides)
COMBOS = [
    ("dino", "path", "path-xattn", ()),
    ("ibot", "path", "path-xattn", ()),
    ("dinov2", "path", "path-conv", ("--model.pool=cls",)),
    ("ibot", "none", "vicreg", ()),
    ("ibot", "sie", "sie", ()),
    ("dinov2", "xattn", "xattn", ()),
]


TEMPS = (0.04, 0.05)  # (class token, patches): a forward argument, as the schedule passes it


def _build(family: str, eq: str, variant: str, *overrides: str) -> tuple[Composed, Batch]:
    cfg = variant_config(variant, *overrides)
    torch.manual_seed(0)
    head = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=family != "dinov2")
    method = build_method(dataclasses.replace(cfg.model, family=family, method=eq, dino=head), cfg.data)
    batch = make_batch(cfg, batch_size=4)
    gen = torch.Generator().manual_seed(1)
    grid = method.encoder.grid
    masks = ibot_masks.block_masks(2 * 4, (grid, grid), random.Random(2), ranges=((0.2, 0.5),))
    masks[0] = False  # one crop unmasked, as half of iBOT's are
    multi = dataclasses.replace(
        batch,
        local=torch.randn(4, LOCAL, 3, LOCAL_SIZE, LOCAL_SIZE, generator=gen),
        masks=masks.view(4, 2, -1),
    )
    return method, multi


def test_the_encoders_mask_path_equals_its_timm_path():
    method, batch = _build("ibot", "path", "path-xattn")
    enc = method.encoder.eval()
    want = enc(batch.view1)  # timm's forward_features
    no_masks = torch.zeros(4, enc.num_patches, dtype=torch.bool)
    masked = enc(batch.view1, no_masks)  # the step-by-step path, nothing masked
    for w, g in zip(want, masked):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    some = no_masks.clone()
    some[:, :3] = True
    with torch.no_grad():
        enc.mask_token.add_(1.0)
    assert not torch.allclose(enc(batch.view1, some).z_inv, want.z_inv)
    small = enc(batch.local[:, 0])  # another size: position embedding resampled
    assert small.z_inv_tokens.shape == (4, (LOCAL_SIZE // 8) ** 2, enc.d_inv)
    with pytest.raises(ValueError, match="multiples of model.patch_size=8"):
        enc(batch.local[:, 0, :, :12, :12])
    plain, _ = _build("dino", "path", "path-xattn")  # DINO masks nothing: its encoder has no mask token
    assert plain.encoder.mask_token is None
    with pytest.raises(ValueError, match="no mask token"):
        plain.encoder(batch.view1, some)


@pytest.mark.parametrize(
    ("family", "eq", "variant", "overrides"), COMBOS, ids=[f"{f}-{e}" for f, e, *_ in COMBOS]
)
def test_terms_finite_and_gradients_reach_the_student_only(family, eq, variant, overrides):
    method, batch = _build(family, eq, variant, *overrides)
    method.train()
    out = method(batch, teacher_temp=TEMPS)
    want = {"loss", "loss/inv", "loss/inv.dino", "loss/eq"}
    want |= {"loss/inv.ibot"} if family != "dino" else set()
    want |= {"loss/inv.koleo"} if family == "dinov2" else set()
    assert want <= out.keys(), out.keys()
    assert all(torch.isfinite(v).all() for v in out.values()), out
    weights = {"ibot": 1.0, "koleo": 0.1}
    inv = out["loss/inv.dino"] + sum(
        w * out[f"loss/inv.{k}"] for k, w in weights.items() if f"loss/inv.{k}" in out
    )
    torch.testing.assert_close(out["loss/inv"].detach(), inv)
    out["loss"].backward()
    trained = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert not any(n.startswith("invariant.teacher.") for n in trained)
    missing = [n for n, p in trained.items() if p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not method.teacher.module.training


def test_centres_move_and_the_teacher_follows():
    method, batch = _build("ibot", "path", "path-xattn")
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    method(batch, teacher_temp=TEMPS)
    objective = method.invariant
    assert objective.center.abs().sum() > 0 and objective.patch_center.abs().sum() > 0
    with torch.no_grad():
        for p in objective.head.parameters():
            p.add_(0.1)
    method.update_teacher(0.9)
    assert not all(torch.equal(a, b) for a, b in zip(method.teacher.parameters(), teacher_before))
    keys = method.state_dict().keys()
    assert {"invariant.center", "invariant.patch_center"} <= keys
    assert any(k.startswith("invariant.teacher.module.head.") for k in keys)


def test_global_crops_alone_are_a_dino_batch():
    method, batch = _build("dino", "none", "vicreg")
    batch.local = None
    out = method(batch, teacher_temp=TEMPS)
    assert torch.isfinite(out["loss"])


def test_masked_family_without_masks_is_a_clear_error():
    method, batch = _build("ibot", "path", "path-xattn")
    batch.masks = None
    with pytest.raises(ConfigError, match=r"needs batch\.masks, bool \(4, 2, 16\)"):
        method(batch, teacher_temp=TEMPS)
    with pytest.raises(ValueError, match="needs this step's teacher temperatures"):
        _build("dino", "path", "path-xattn")[0](batch)
    cfg = variant_config("vicreg")
    with pytest.raises(ConfigError, match="unknown model.family 'byol'"):
        build_method(dataclasses.replace(cfg.model, family="byol"), cfg.data)
    with pytest.raises(ConfigError, match="unknown DINO family 'byol'"):
        DinoObjective(dataclasses.replace(cfg.model, family="byol"), cfg.data, method.encoder)


def test_state_dict_restores_student_teacher_and_centres_exactly():
    method, batch = _build("ibot", "path", "path-xattn")
    method(batch, teacher_temp=TEMPS)  # centres off zero
    method.update_teacher(0.5)
    restored, _ = _build("ibot", "path", "path-xattn")
    torch.manual_seed(3)
    for p in restored.parameters():  # another state everywhere, then the checkpoint
        p.data.normal_()
    restored.load_state_dict(method.state_dict())
    method.eval()
    restored.eval()
    want, got = method(batch, teacher_temp=TEMPS), restored(batch, teacher_temp=TEMPS)
    assert all(torch.equal(want[k], got[k]) for k in want)
    mine, theirs = method.invariant, restored.invariant
    assert torch.equal(mine.center, theirs.center) and torch.equal(mine.patch_center, theirs.patch_center)


def _train(model, method: Composed, batch: Batch, steps: int, momentum: float) -> torch.Tensor:
    """`steps` AdamW steps of `model` (the method, or its DDP wrapper) on one batch, the teacher following
    at `momentum` after each; -> the losses (steps,)."""
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        out = model(batch, teacher_temp=TEMPS)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        method.update_teacher(momentum)
        losses.append(out["loss"].detach())
    return torch.stack(losses)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        method, batch = _build("ibot", "path", "path-xattn")
        batch.view1 = batch.view1 + rank  # each rank its own images
        batch.local = batch.local * (1 + rank)
        model = torch.nn.parallel.DistributedDataParallel(method)
        # two steps: a parameter without gradient would fail DDP's second reduction
        losses = _train(model, method, batch, steps=2, momentum=0.99)
        torch.save({"state": method.state_dict(), "losses": losses}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow  # two spawned processes that import torch and timm: ~30 s on 2 busy cores
def test_two_ddp_ranks_keep_student_teacher_and_centres_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.isfinite(r0["losses"]).all() and not torch.equal(r0["losses"], r1["losses"])
    assert r0["state"]["invariant.center"].abs().sum() > 0
    for key, value in r0["state"].items():  # the centres see both ranks' images: equal, like the weights
        torch.testing.assert_close(r1["state"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("family", ["dino", "ibot", "dinov2"])
def test_the_student_learns_the_teachers_targets(family):
    """On one fixed batch, a few AdamW steps (teacher following at momentum 0.9) cut the loss."""
    method, batch = _build(family, "none", "vicreg")
    losses = _train(method, method, batch, steps=6, momentum=0.9).tolist()
    assert losses[-1] < 0.75 * losses[0], losses
