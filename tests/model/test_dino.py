"""model/dino.py against the official code (tests/model/oracles/): heads, DINO / iBOT / DINOv2 losses,
centring, Sinkhorn-Knopp and KoLeo to 1e-6 in value and gradient (float64), on one process and on two
Gloo ranks against the oracle on the concatenated batch; iBOT's block masks draw for draw."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage  # scikit-learn's dependency (the dev extra)

from model import dino
from pipeline import masks as ibot_masks
from pipeline.errors import ConfigError
from tests.model.oracles import dino_official, dinov2_official, ibot_official

TOL = {"rtol": 1e-6, "atol": 1e-9}
FP32_TOL = {
    "rtol": 1e-5,
    "atol": 1e-7,
}  # against the Sinkhorn oracle's own targets, which it computes in fp32
B, K, L, N = 4, 32, 3, 16  # images per rank, prototypes, local crops, patches per crop (4×4 grid)


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_(grad)
    return x


def _masks(n_crops: int, gen: torch.Generator) -> torch.Tensor:
    """(n_crops, N) bool: random patches, and the first crop without any (its loss counts 0)."""
    masks = torch.rand(n_crops, N, generator=gen) < 0.4
    masks[0] = False
    return masks


def _temps() -> dict:
    """The official warm-up schedules (0.04 -> 0.07 over 3 of 5 epochs); each test uses epoch 1."""
    return {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3, "nepochs": 5}


EPOCH = 1
TEMP = 0.055  # the schedules' value at EPOCH


# --- heads ---------------------------------------------------------------------------------------------


def _copy_head(official: torch.nn.Module, mine: dino.DINOHead) -> None:
    with torch.no_grad():
        for (name, p), (_, q) in zip(official.mlp.named_parameters(), mine.mlp.named_parameters()):
            q.copy_(p)
        weight = mine.last_layer.parametrizations.weight
        weight.original0.copy_(official.last_layer.weight_g)
        weight.original1.copy_(official.last_layer.weight_v)


@pytest.mark.filterwarnings("ignore:.*weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("which", ["dino", "dinov2"])
def test_head_matches_official(which):
    torch.manual_seed(0)
    if which == "dino":
        official = dino_official.DINOHead(24, K, hidden_dim=40, bottleneck_dim=8)
        mine = dino.DINOHead(24, K, hidden_dim=40, bottleneck_dim=8)
    else:
        official = dinov2_official.DINOHead(24, K, hidden_dim=40, bottleneck_dim=8)
        mine = dino.DINOHead(24, K, hidden_dim=40, bottleneck_dim=8, norm_last_layer=False)
    official, mine = official.double(), mine.double()
    _copy_head(official, mine)
    gain = mine.last_layer.parametrizations.weight.original0
    assert gain.requires_grad == official.last_layer.weight_g.requires_grad
    assert torch.equal(gain.detach(), torch.ones(K, 1, dtype=torch.float64))
    assert sum(isinstance(m, torch.nn.Linear) for m in mine.mlp) == 3

    x = torch.randn(6, 24, dtype=torch.float64)
    want, got = official(x), mine(x)
    torch.testing.assert_close(got, want, **TOL)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    for (name, p), q in zip(official.mlp.named_parameters(), mine.mlp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
    weight = mine.last_layer.parametrizations.weight
    torch.testing.assert_close(weight.original1.grad, official.last_layer.weight_v.grad, **TOL)
    if gain.requires_grad:
        torch.testing.assert_close(gain.grad, official.last_layer.weight_g.grad, **TOL)


# --- DINO ----------------------------------------------------------------------------------------------


def test_dino_loss_and_centre_match_official_over_steps():
    gen = torch.Generator().manual_seed(1)
    official = dino_official.DINOLoss(K, ncrops=2 + L, **_temps()).double()
    center = torch.zeros(K, dtype=torch.float64)
    for _ in range(3):  # the centre moves: each step uses the centre of the steps before
        student = _randn((2 + L) * B, K, gen=gen, scale=3.0, grad=True)
        teacher = _randn(2 * B, K, gen=gen, scale=3.0)
        want = official(student, teacher, EPOCH)
        (want_grad,) = torch.autograd.grad(want, student)

        targets = dino.teacher_softmax(teacher, center, TEMP).view(2, B, K)
        got = dino.dino_loss(student.view(2 + L, B, K), targets)
        (got_grad,) = torch.autograd.grad(got, student)
        center = dino.update_center(center, teacher)

        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
        torch.testing.assert_close(center, official.center.flatten(), **TOL)


def test_dino_loss_rejects_mismatched_crops():
    with pytest.raises(ValueError, match="dino_loss"):
        dino.dino_loss(torch.zeros(1, B, K), torch.zeros(2, B, K))
    with pytest.raises(ValueError, match="dino_loss"):
        dino.dino_loss(torch.zeros(3, B + 1, K), torch.zeros(2, B, K))


# --- iBOT ----------------------------------------------------------------------------------------------


def _ibot_official(**kw):
    return ibot_official.iBOTLoss(
        K,
        K,
        ngcrops=2,
        nlcrops=L,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp2=0.04,
        teacher_temp2=0.07,
        warmup_teacher_temp_epochs=3,
        nepochs=5,
        **kw,
    ).double()


def test_ibot_loss_and_centres_match_official_over_steps():
    gen = torch.Generator().manual_seed(2)
    official = _ibot_official()
    center, center2 = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for _ in range(3):
        s_cls = _randn(2 * B, K, gen=gen, scale=3.0, grad=True)
        s_local = _randn(L * B, K, gen=gen, scale=3.0, grad=True)
        s_patch = _randn(2 * B, N, K, gen=gen, scale=3.0, grad=True)
        t_cls, t_patch = _randn(2 * B, K, gen=gen, scale=3.0), _randn(2 * B, N, K, gen=gen, scale=3.0)
        masks = _masks(2 * B, gen)  # (2B, N), crop-major like the official chunks
        want = official((s_cls, s_patch), (t_cls, t_patch), s_local, list(masks.view(2, B, 4, 4)), EPOCH)
        want_grads = torch.autograd.grad(want["loss"], (s_cls, s_local, s_patch))

        cls_targets = dino.teacher_softmax(t_cls, center, TEMP).view(2, B, K)
        got_cls = dino.dino_loss(torch.cat([s_cls, s_local]).view(2 + L, B, K), cls_targets)
        patch_targets = dino.teacher_softmax(t_patch[masks], center2, TEMP)  # (M, K)
        got_patch = dino.ibot_patch_loss(s_patch[masks], patch_targets, masks)
        got_grads = torch.autograd.grad(got_cls + got_patch, (s_cls, s_local, s_patch))
        center = dino.update_center(center, t_cls)
        center2 = dino.update_center(center2, t_patch.mean(1))  # iBOT: each crop's mean over all patches

        torch.testing.assert_close(got_cls, want["cls"], **TOL)
        torch.testing.assert_close(got_patch, want["patch"], **TOL)
        for got_g, want_g in zip(got_grads, want_grads):
            torch.testing.assert_close(got_g, want_g, **TOL)
        torch.testing.assert_close(center, official.center.flatten(), **TOL)
        torch.testing.assert_close(center2, official.center2.flatten(), **TOL)


def test_ibot_patch_loss_rejects_unselected_tokens():
    masks = torch.zeros(2, N, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match="M = 3 masked patches"):
        dino.ibot_patch_loss(torch.zeros(2 * N, K), torch.zeros(2 * N, K), masks)


# --- DINOv2 --------------------------------------------------------------------------------------------


def _sinkhorn_logits(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Teacher logits for the Sinkhorn oracle, which computes in fp32 (`teacher_output.float()`): float32
    values of moderate size, so that exp(t / temp) stays in fp32's range."""
    return torch.randn(rows, K, generator=gen).double()


def _dinov2_dino_loss(official, s_global, s_local, t_cls, temp):
    """ssl_meta_arch.forward_backward's DINO terms, as the official trainer combines them."""
    t_chunks = t_cls.chunk(2)
    swapped = torch.cat((t_chunks[1], t_chunks[0]))  # "chunked and cat'd in reverse so A is matched to B"
    targets = official.sinkhorn_knopp_teacher(swapped, teacher_temp=temp).view(2, -1, K)
    terms = 2 * L + 2
    local = official(s_local.chunk(L), targets) / terms
    glob = official([s_global], [targets.flatten(0, 1)]) * 2 / terms
    return local + glob


def test_dinov2_dino_loss_with_sinkhorn_matches_official():
    gen = torch.Generator().manual_seed(3)
    official = dinov2_official.DINOLoss(K).double()
    s_global = _randn(2 * B, K, gen=gen, scale=3.0, grad=True)
    s_local = _randn(L * B, K, gen=gen, scale=3.0, grad=True)
    t_cls = _sinkhorn_logits(2 * B, gen)
    want = _dinov2_dino_loss(official, s_global, s_local, t_cls, TEMP)
    want_grads = torch.autograd.grad(want, (s_global, s_local))

    want_targets = official.sinkhorn_knopp_teacher(t_cls, TEMP)
    torch.testing.assert_close(dino.sinkhorn_knopp(t_cls, TEMP), want_targets.double(), **FP32_TOL)

    got = dino.dino_loss(torch.cat([s_global, s_local]).view(2 + L, B, K), want_targets.view(2, B, K))
    got_grads = torch.autograd.grad(got, (s_global, s_local))
    torch.testing.assert_close(got, want, **TOL)
    for got_g, want_g in zip(got_grads, want_grads):
        torch.testing.assert_close(got_g, want_g, **TOL)


def test_dinov2_ibot_patch_loss_with_sinkhorn_matches_official():
    gen = torch.Generator().manual_seed(4)
    official = dinov2_official.iBOTPatchLoss(K).double()
    masks = _masks(2 * B, gen)
    m = int(masks.sum())
    s_masked = _randn(m, K, gen=gen, scale=3.0, grad=True)
    t_masked = _sinkhorn_logits(m, gen)
    want_targets = official.sinkhorn_knopp_teacher(t_masked, TEMP, torch.tensor([m]))
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]  # the collate's
    # ssl_meta_arch: forward_masked(...) * loss_scales (2) * ibot_loss_scale (1 / 2 global crops)
    want = (
        official.forward_masked(s_masked, want_targets, masks, n_masked_patches=m, masks_weight=weights)
        * 2
        / 2
    )
    (want_grad,) = torch.autograd.grad(want, s_masked)

    torch.testing.assert_close(dino.sinkhorn_knopp(t_masked, TEMP), want_targets.double(), **FP32_TOL)
    got = dino.ibot_patch_loss(s_masked, want_targets, masks)
    (got_grad,) = torch.autograd.grad(got, s_masked)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_koleo_matches_official():
    gen = torch.Generator().manual_seed(5)
    x = _randn(2 * B, 12, gen=gen, grad=True)
    x_dup = torch.cat([x[:3], x[:1], x[4:]])  # a duplicate row in the first half: distance 0, eps decides
    for inputs in (x, x_dup):
        want = sum(dinov2_official.KoLeoLoss()(p) for p in inputs.chunk(2))
        (want_grad,) = torch.autograd.grad(want, x)
        got = sum(dino.koleo_loss(p) for p in inputs.chunk(2))
        (got_grad,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
    with pytest.raises(ValueError, match="B >= 2"):
        dino.koleo_loss(x[:1])


def test_sinkhorn_targets_are_balanced_assignments():
    gen = torch.Generator().manual_seed(6)
    q = dino.sinkhorn_knopp(_randn(64, K, gen=gen), 0.1, n_iterations=1000)  # run to convergence
    torch.testing.assert_close(q.sum(1), torch.ones(64, dtype=torch.float64))  # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((K,), 64 / K, dtype=torch.float64))  # prototypes balanced


def test_sinkhorn_survives_logits_that_overflow_exp():
    """DINOv2's prototype gain trains, so logits / temp can pass exp's range (88 in fp32): the
    official code then returns NaN; the shift by the global maximum keeps the same targets finite."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(16, K, generator=gen) * 0.5
    small = dino.sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(small, dinov2_official.DINOLoss(K).sinkhorn_knopp_teacher(logits, 0.04))
    shifted = dino.sinkhorn_knopp(logits + 50.0, 0.04)  # exp(50 / 0.04) = inf in fp32
    assert dinov2_official.DINOLoss(K).sinkhorn_knopp_teacher(logits + 50.0, 0.04).isnan().any()
    torch.testing.assert_close(shifted, small)


# --- two Gloo ranks against the oracle on the concatenated batch ---------------------------------------


W = 2


def _global_inputs() -> dict[str, torch.Tensor]:
    """One global batch of W·B images: (crop, image, ...) tensors that the ranks split along images."""
    gen = torch.Generator().manual_seed(8)
    masks = _masks(2 * W * B, gen).view(2, W * B, N)
    masks[:, B:] |= torch.rand(2, (W - 1) * B, N, generator=gen) < 0.3  # ranks hold different M
    return {
        "student": _randn(2 + L, W * B, K, gen=gen, scale=3.0),
        "teacher": _randn(2, W * B, K, gen=gen, scale=1.0),
        "center": _randn(K, gen=gen),
        "s_patch": _randn(2, W * B, N, K, gen=gen, scale=3.0),
        "t_patch": _randn(2, W * B, N, K, gen=gen, scale=1.0),
        "masks": masks,
    }


def _rank_slice(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[:, rank * B : (rank + 1) * B]


def _dino_family_on(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model/dino.py on one rank's slice (or the whole batch): losses, gradients, centres, targets."""
    student = inputs["student"].clone().requires_grad_(True)
    s_patch = inputs["s_patch"].clone().requires_grad_(True)
    teacher, t_patch, masks = inputs["teacher"], inputs["t_patch"], inputs["masks"].flatten(0, 1)
    g, b = teacher.shape[:2]
    out = {}
    out["dino"] = dino.dino_loss(student, dino.teacher_softmax(teacher, inputs["center"], TEMP))
    out["center"] = dino.update_center(inputs["center"], teacher.flatten(0, 1))
    out["center2"] = dino.update_center(inputs["center"], t_patch.flatten(0, 1).mean(1))
    out["sk_cls"] = dino.sinkhorn_knopp(teacher.flatten(0, 1), TEMP).view(g, b, K)
    out["sk_patch"] = dino.sinkhorn_knopp(t_patch.flatten(0, 1)[masks], TEMP)  # (M, K), M differs per rank
    patch_targets = dino.teacher_softmax(t_patch.flatten(0, 1)[masks], inputs["center"], TEMP)
    out["ibot"] = dino.ibot_patch_loss(s_patch.flatten(0, 1)[masks], patch_targets, masks)
    out["d_student"], out["d_s_patch"] = torch.autograd.grad(out["dino"] + out["ibot"], (student, s_patch))
    return {k: v.detach() for k, v in out.items()}


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        inputs = _global_inputs()
        mine = {k: (_rank_slice(v, rank) if k != "center" else v) for k, v in inputs.items()}
        torch.save(_dino_family_on(mine), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow  # two spawned processes that import torch and timm: ~20-40 s on 2 busy cores
def test_two_ranks_match_the_oracle_on_the_concatenated_batch(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    inputs = _global_inputs()

    # The official code on one process over all W·B images.
    official = _ibot_official()
    official.center.copy_(inputs["center"])
    official.center2.copy_(inputs["center"])
    s_cls = inputs["student"].clone().requires_grad_(True)
    s_patch = inputs["s_patch"].clone().requires_grad_(True)
    teacher, t_patch = inputs["teacher"], inputs["t_patch"]
    masks = inputs["masks"].view(2, W * B, 4, 4)
    want = official(
        (s_cls[:2].flatten(0, 1), s_patch.flatten(0, 1)),
        (teacher.flatten(0, 1), t_patch.flatten(0, 1)),
        s_cls[2:].flatten(0, 1),
        list(masks),
        EPOCH,
    )
    want_d_student, want_d_s_patch = torch.autograd.grad(want["loss"], (s_cls, s_patch))
    want_sk_cls = (
        dinov2_official.DINOLoss(K).sinkhorn_knopp_teacher(teacher.flatten(0, 1), TEMP).view(2, W * B, K)
    )
    flat_masks = inputs["masks"].flatten(0, 1)
    want_sk_patch = dinov2_official.iBOTPatchLoss(K).sinkhorn_knopp_teacher(
        t_patch.flatten(0, 1)[flat_masks], TEMP, torch.tensor([int(flat_masks.sum())])
    )

    for name in ("center", "center2"):
        want_c = getattr(official, name).flatten()
        for r in ranks:
            torch.testing.assert_close(r[name], want_c, **TOL)
    # Each rank's loss is over its images; DDP averages their gradients: the global loss is their mean.
    torch.testing.assert_close(sum(r["dino"] for r in ranks) / W, want["cls"], **TOL)
    torch.testing.assert_close(sum(r["ibot"] for r in ranks) / W, want["patch"], **TOL)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["sk_cls"], _rank_slice(want_sk_cls, rank).double(), **FP32_TOL)
        torch.testing.assert_close(r["d_student"] / W, _rank_slice(want_d_student, rank), **TOL)
        torch.testing.assert_close(r["d_s_patch"] / W, _rank_slice(want_d_s_patch, rank), **TOL)
    # Sinkhorn over masked patches, whose count differs per rank: each rank's rows are the oracle's rows
    # for the same (crop, image, patch) positions.
    position = torch.arange(2 * W * B * N).view(2, W * B, N)
    full = torch.zeros(2 * W * B * N, K, dtype=torch.float64)
    full[position.flatten()[inputs["masks"].flatten()]] = want_sk_patch.double()
    counts = []
    for rank, r in enumerate(ranks):
        rank_masks = _rank_slice(inputs["masks"], rank)
        counts.append(int(rank_masks.sum()))
        torch.testing.assert_close(r["sk_patch"], full[_rank_slice(position, rank)[rank_masks]], **FP32_TOL)
    assert counts[0] != counts[1]


# --- block masks ---------------------------------------------------------------------------------------


def test_block_masks_draw_for_draw_as_ibot():
    """Seeded alike, iBOT's ImageFolderMask (pred_ratio 0 0.3, var 0 0.2) and block_masks make the
    same masks: the same ratio distribution and the same blocks."""
    official = ibot_official.iBOTMaskGenerator(
        patch_size=16, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_aspect_ratio=(0.3, 1 / 0.3)
    )
    crops = [torch.zeros(3, 224, 224)] * 2  # the two global crops of one image: a 14×14 grid
    random.seed(9)
    want = [torch.from_numpy(m).flatten() for _ in range(100) for m in official.masks_for(crops)]
    rng = random.Random(9)
    got = [m for _ in range(100) for m in ibot_masks.block_masks(2, (14, 14), rng)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(got) == len(want) == 200


def test_block_mask_draw_for_draw_as_dinov2():
    official = dinov2_official.MaskingGenerator(input_size=(14, 14), max_num_patches=0.5 * 14 * 14)
    random.seed(10)
    targets = [0, 5, 20, 60, 98, 150]
    want = [torch.from_numpy(official(n)) for n in targets]
    rng = random.Random(10)
    got = [ibot_masks.block_mask((14, 14), n, rng, min_block=4, max_block=0.5 * 14 * 14) for n in targets]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_mask_ratio_statistics_and_block_shapes():
    rng = random.Random(11)
    masks = ibot_masks.block_masks(1000, (14, 14), rng)  # (1000, 196)
    ratios = masks.float().mean(1)
    unmasked = (ratios == 0).float().mean().item()
    assert abs(unmasked - 0.5) < 0.06, unmasked  # 0 with probability 1/2 (binomial sd 0.016)
    masked = ratios[ratios > 0]
    assert masked.max() <= 0.5 + 1e-9  # never past the drawn ratio
    assert masked.min() > 0.07  # U(0.1, 0.5), covered up to a few patches
    assert abs(masked.mean().item() - 0.3) < 0.02, masked.mean()
    assert (masked < 0.2).float().mean() > 0.15 and (masked > 0.4).float().mean() > 0.15  # spread, not peaked
    # Blocks, not scattered patches: a masked crop is one to a few connected rectangles (scattered
    # patches at these ratios make ~25 components).
    components = [ndimage.label(m.view(14, 14).numpy())[1] for m in masks[ratios > 0]]
    assert sum(components) / len(components) < 2.0 and max(components) <= 5, components


def test_block_mask_never_exceeds_the_target():
    rng = random.Random(12)
    for n in [1, 3, 10.5, 17, 40, 97.9]:
        for _ in range(20):
            assert ibot_masks.block_mask((14, 14), n, rng).sum() <= n
    assert math.isclose(ibot_masks.sample_mask_ratio(random.Random(0), ((0.2, 0.2),)), 0.2)


def test_losses_run_in_fp32_under_autocast():
    """bf16 logits under autocast give the fp32 result of the same logits: the softmax statistics,
    the cross-entropy contraction and Sinkhorn do not run in bf16."""
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(2 + L, B, K, generator=gen).bfloat16()
    teacher = torch.randn(2 * B, K, generator=gen).bfloat16()
    masks = _masks(2 * B, gen)
    patches = torch.randn(int(masks.sum()), K, generator=gen).bfloat16()

    def terms():
        targets = dino.sinkhorn_knopp(teacher, TEMP)
        return torch.stack(
            [
                dino.dino_loss(student, targets.view(2, B, K)),
                dino.ibot_patch_loss(patches, dino.teacher_softmax(patches, torch.zeros(K), TEMP), masks),
                dino.koleo_loss(student[0]),
            ]
        )

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = terms()
    student, teacher, patches = student.float(), teacher.float(), patches.float()
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, terms(), rtol=1e-6, atol=1e-6)


def test_head_rejects_impossible_sizes():
    with pytest.raises(ConfigError, match="nlayers >= 1"):
        dino.DINOHead(16, K, nlayers=0)
