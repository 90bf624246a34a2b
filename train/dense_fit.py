"""The dense probes' heads, their training, the k-NN retrieval, and the metrics.

seg    BatchNorm2d(D) + 1×1 conv (a linear layer per patch) -> C logits; bilinear upsampling to S×S;
       cross-entropy with ignore index 255.
depth  BatchNorm2d(D) + 1×1 conv -> log-depth (`log`: depth = exp(out)) or `bins` logits as DINOv2's
       linear depth head classifies (ReLU + 0.1, normalised, times n_bins centres linspace(min, max));
       depth bilinearly upsampled to S×S; DINOv2's SigLoss sqrt(var(g) + 0.15·mean(g)²),
       g = log(pred) - log(gt), over valid pixels (min <= gt <= max).
both   AdamW(lr, weight_decay), linear warm-up then cosine to 0 (or constant), minibatches of windows.
knn    each query patch takes the k most cosine-similar bank patches; its class distribution is
       softmax(sim / T)-weighted mean of their label distributions (Hummingbird's retrieval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dense_data import IGNORE


@dataclass(frozen=True)
class HeadConfig:
    """How a linear head is trained on frozen feature maps."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch: int = 16  # windows per step
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    warmup: float = 0.1  # fraction of the steps with a linear warm-up
    depth_head: str = "log"  # log | bins
    bins: int = 256
    min_depth: float = 1e-3  # metres: the valid range, for the loss, the bins and the metrics
    max_depth: float = 10.0


SCHEDULES = ("cosine", "constant")
DEPTH_HEADS = ("log", "bins")


def linear_head(dim: int, out: int) -> nn.Module:
    """BatchNorm + a linear layer applied to every patch: (B, D, g, g) -> (B, out, g, g)."""
    return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out, kernel_size=1))


def depth_of(out: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    """Head output (B, 1 | bins, g, g) -> depth (B, 1, g, g) in metres."""
    if cfg.depth_head == "log":
        return out.exp()
    p = torch.relu(out) + 0.1  # DINOv2's "linear" normalisation of the bin scores
    p = p / p.sum(dim=1, keepdim=True)
    centres = torch.linspace(cfg.min_depth, cfg.max_depth, cfg.bins, device=out.device)
    return torch.einsum("bkhw,k->bhw", p, centres)[:, None]


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    """DINOv2's SigLoss over the valid pixels of a batch; pred, gt (B, H, W) metres."""
    valid = (gt >= cfg.min_depth) & (gt <= cfg.max_depth)
    if not valid.any():
        return pred.sum() * 0
    g = pred[valid].clamp_min(1e-6).log() - gt[valid].log()
    return torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2 + 1e-12)


def head_loss(out: torch.Tensor, labels: torch.Tensor, task: str, cfg: HeadConfig) -> torch.Tensor:
    """A head's output (B, C | 1 | bins, g, g) against window labels (B, S, S): upsampled to S×S, then
    cross-entropy ignoring 255 (seg) or SigLoss on the valid depths (depth)."""
    size = labels.shape[-2:]
    if task == "seg":
        logits = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        y = labels.long()
        return F.cross_entropy(logits, y, ignore_index=IGNORE) if (y != IGNORE).any() else out.sum() * 0
    pred = F.interpolate(depth_of(out, cfg), size=size, mode="bilinear", align_corners=False)
    return sig_loss(pred[:, 0], labels.float(), cfg)


def lr_factor(step: int, total: int, cfg: HeadConfig) -> float:
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def fit_head(
    feats: torch.Tensor, labels: torch.Tensor, task: str, out: int, cfg: HeadConfig, seed: int, device
) -> nn.Module:
    """Train a linear head on (N, D, g, g) window features for (N, S, S) labels (class indices or metres)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = linear_head(feats.shape[1], out).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(feats) / cfg.batch)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(feats), generator=gen)
        for start in range(0, len(feats), cfg.batch):
            idx = order[start : start + cfg.batch]
            x, y = feats[idx].to(device).float(), labels[idx].to(device)
            if len(idx) == 1:  # BatchNorm's statistics over one window's patches are still batch stats
                x = x.expand(2, *x.shape[1:])
                y = y.expand(2, *y.shape[1:])
            loss = head_loss(head(x), y, task, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


# ------------------------------------------------------------------------------------------ retrieval


def patch_labels(labels: torch.Tensor, patch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window labels (N, S, S) -> each patch's class distribution (N·g·g, C) and which patches have any
    labelled pixel (N·g·g,) bool; ignored pixels count for nothing."""
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), classes).float() * valid[..., None]
    hist = F.avg_pool2d(onehot.permute(0, 3, 1, 2), patch) * patch * patch  # (N, C, g, g) pixel counts
    hist = hist.permute(0, 2, 3, 1).reshape(-1, classes)
    has = hist.sum(1) > 0
    return hist / hist.sum(1, keepdim=True).clamp_min(1), has


def topk_cosine(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of every query -> (similarities, indices), each (Q, k),
    computed a chunk of queries × a chunk of the bank at a time: a running top-k is merged with each
    bank chunk's, so memory is O(chunk²) whatever the bank's size. Inputs are L2-normalised here."""
    k = min(k, len(bank))
    sims, idxs = [], []
    for q0 in range(0, len(queries), chunk):
        q = F.normalize(queries[q0 : q0 + chunk].to(device).float(), dim=1)
        best_s = q.new_full((len(q), 0), -math.inf)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for b0 in range(0, len(bank), chunk):
            b = F.normalize(bank[b0 : b0 + chunk].to(device).float(), dim=1)
            s = q @ b.T  # (q, b)
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)
            best_s, at = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
            best_i = torch.cat([best_i, ci + b0], 1).gather(1, at)
        sims.append(best_s.cpu())
        idxs.append(best_i.cpu())
    return torch.cat(sims), torch.cat(idxs)


def knn_labels(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    temperature: float,
    chunk: int,
    device,
) -> torch.Tensor:
    """Query patches (Q, D) -> class distributions (Q, C) from their k nearest bank patches."""
    sims, idx = topk_cosine(queries, bank, k, chunk, device)
    weights = torch.softmax(sims / temperature, dim=1)  # (Q, k)
    return torch.einsum("qk,qkc->qc", weights, bank_labels[idx])


# ------------------------------------------------------------------------------------------ metrics


def confusion(pred: torch.Tensor, gt: torch.Tensor, classes: int) -> torch.Tensor:
    """(H, W) class maps -> (C, C) counts [gt, pred] over the pixels not ignored."""
    keep = gt != IGNORE
    return torch.bincount(gt[keep] * classes + pred[keep], minlength=classes * classes).reshape(
        classes, classes
    )


def seg_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU and mean accuracy over the classes present in the ground truth or the predictions (a class
    in neither has no IoU: left out, as mmseg's nanmean), and pixel accuracy."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = tp[union > 0] / union[union > 0]
    acc = tp[gt > 0] / gt[gt > 0]
    return {
        "miou": float(iou.mean()) if len(iou) else 0.0,
        "macc": float(acc.mean()) if len(acc) else 0.0,
        "pacc": float(tp.sum() / conf.sum().clamp_min(1)),
    }


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, cfg: HeadConfig) -> dict[str, float] | None:
    """One image's RMSE (m), AbsRel and δ<1.25 over its valid pixels; pred clamped to the valid range.
    None when the image has no valid pixel."""
    valid = (gt >= cfg.min_depth) & (gt <= cfg.max_depth)
    if not valid.any():
        return None
    p, g = pred[valid].clamp(cfg.min_depth, cfg.max_depth).double(), gt[valid].double()
    return {
        "rmse": float(((p - g) ** 2).mean().sqrt()),
        "absrel": float(((p - g).abs() / g).mean()),
        "delta1": float((torch.maximum(p / g, g / p) < 1.25).double().mean()),
    }
