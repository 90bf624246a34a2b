"""Dense probes, unit level: chunked top-k equals the unchunked search, the metrics on hand-made cases,
the window rule and its reassembly, patch labels, the feature maps of a timm ViT (last and last-4
layers), and a linear head that learns a task its features carry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.dense_data import IGNORE, Pair
from train.backbones import load_backbone
from train.dense_fit import (
    HeadConfig,
    confusion,
    depth_metrics,
    depth_of,
    fit_head,
    knn_labels,
    patch_labels,
    seg_metrics,
    topk_cosine,
)
from train.dense_views import DenseEncoder, Item, assemble, resized_size, windows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chunked_topk_equals_the_unchunked_search():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(70, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    full = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T  # the whole (70, 1000) matrix at once
    want_s, want_i = full.topk(30, dim=1)
    for chunk in (64, 333, 4096):  # bank 1000 rows: 16, 4 and 1 chunks; queries 70: 2, 1, 1 chunks
        sims, idx = topk_cosine(queries, bank, 30, chunk, "cpu")
        assert torch.equal(idx, want_i), chunk
        assert torch.allclose(sims, want_s, atol=1e-6)
    labels = F.one_hot(torch.randint(5, (1000,), generator=gen), 5).float()
    one = knn_labels(queries, bank, labels, 30, 0.02, 1000, "cpu")
    many = knn_labels(queries, bank, labels, 30, 0.02, 64, "cpu")
    assert torch.allclose(one, many, atol=1e-6) and torch.allclose(one.sum(1), torch.ones(70))


def test_knn_labels_a_patch_by_its_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = knn_labels(torch.tensor([[2.0, 0.1], [0.0, 3.0]]), bank, labels, 2, 0.02, 3, "cpu")
    assert torch.equal(out.argmax(1), torch.tensor([0, 1])) and out[0, 0] > 0.99


def test_seg_metrics_on_a_known_confusion():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = confusion(pred, gt, 4)  # class 3 absent from both: no IoU
    assert conf.sum() == 7
    m = seg_metrics(conf)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 3 / (3 + 4 - 3) = 3/4; class 2: 1 / (2 + 1 - 1) = 1/2
    assert m["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert m["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["pacc"] == pytest.approx(5 / 7)


def test_depth_metrics_and_valid_range():
    cfg = HeadConfig(min_depth=0.5, max_depth=10.0)
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0: no measurement, left out
    assert depth_metrics(gt.clone(), gt, cfg) == {"rmse": 0.0, "absrel": 0.0, "delta1": 1.0}
    m = depth_metrics(gt * 2, gt, cfg)
    assert m["absrel"] == pytest.approx(1.0) and m["delta1"] == 0.0
    assert m["rmse"] == pytest.approx(((1 + 4 + 16) / 3) ** 0.5)
    assert depth_metrics(gt, torch.zeros(2, 2), cfg) is None
    # bins: a one-hot bin score gives that bin's centre (ReLU + 0.1 normalisation spreads a little)
    out = torch.full((1, 5, 1, 1), -1.0)
    out[0, 2] = 1e6
    assert depth_of(
        out, HeadConfig(depth_head="bins", bins=5, min_depth=1, max_depth=5)
    ).item() == pytest.approx(3.0)


def test_windows_tile_the_canvas_and_reassemble():
    assert resized_size((48, 64), 32, "slide") == (32, 43) and resized_size((48, 64), 32, "resize") == (
        32,
        32,
    )
    corners = windows((32, 43), 32, 16)
    assert corners == [(0, 0), (0, 11)]  # the last window flush with the edge
    assert windows((32, 32), 32, 16) == [(0, 0)]
    item = Item(Pair(None, None), torch.zeros(48, 64), (32, 43), corners)
    maps = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 3.0)])  # window 0 = 1, window 1 = 3
    out = assemble(maps, item, 32)
    assert out.shape == (3, 48, 64)
    # left: window 0 only; right: window 1 only (up to the canvas's bilinear upsampling)
    assert out[:, :, 0].sub(1).abs().max() < 1e-5 and out[:, :, -1].sub(3).abs().max() < 1e-5
    assert out[:, :, 32].sub(2).abs().max() < 1e-5  # the overlap: the mean of both


def test_patch_labels_are_class_histograms():
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, :2, :2] = torch.tensor([[0, 0], [1, IGNORE]])  # patch (0, 0): 2 of class 0, 1 of class 1
    labels[0, 2:, 2:] = 1
    dist, has = patch_labels(labels, 2, 3)
    assert has.tolist() == [True, False, False, True]
    assert torch.allclose(dist[0], torch.tensor([2 / 3, 1 / 3, 0])) and dist[3].tolist() == [0, 1, 0]


def test_dense_encoder_last_and_last_four_layers():
    bb = load_backbone("timm:vit_tiny_patch16_224", img_size=32)
    x = torch.rand(2, 3, 32, 32)
    one, four = DenseEncoder(bb, 1)(x), DenseEncoder(bb, 4)(x)
    assert one.shape == (2, 192, 2, 2) and four.shape == (2, 4 * 192, 2, 2)
    # The last of the four is the last layer's normed patch tokens, i.e. forward_features'.
    assert torch.allclose(four[:, -192:], one, atol=1e-5)
    tokens = bb.model.forward_features(
        (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    )
    assert torch.allclose(one.flatten(2).transpose(1, 2), tokens[:, bb.num_prefix_tokens :], atol=1e-5)


def test_linear_head_learns_what_the_features_carry():
    # Features whose first channel is the class (+ noise); the labels are that class per patch.
    gen = torch.Generator().manual_seed(0)
    cls = torch.randint(3, (40, 4, 4), generator=gen)
    feats = torch.randn(40, 8, 4, 4, generator=gen) * 0.1
    feats[:, 0] += cls.float()
    feats[:, 1] += (cls == 1).float()
    labels = cls.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (40, 16, 16): patch 4
    head = fit_head(feats, labels, "seg", 3, HeadConfig(epochs=30, lr=1e-2, batch=8), 0, "cpu")
    pred = F.interpolate(head(feats), size=(16, 16), mode="bilinear").argmax(1)
    assert (pred == labels).float().mean() > 0.9
