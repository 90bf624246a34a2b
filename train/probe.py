"""Frozen-backbone probes: how much transformation information the features keep, and how invariant they are.

    python train/probe.py equivariance --backbone RUN/ckpt/last.pt [--data SHARDS] [--split val]
        [--part all|inv|eq[,...]] [--pool mean|cls] [--transforms rotation,color,blur,translation,crop,flip]
        [--samples N] [--out results.json]
    python train/probe.py linear --backbone backbone.safetensors --data SHARDS [--out results.json]

`--backbone` is a training checkpoint (model state + resolved config; every part available) or a
`train/export.py` export (`backbone.safetensors` + its JSON; `--part inv|eq` needs an export that
carries the head). Without `--data` the probes read the embedded demo photos.

Equivariance protocol (SIE, Garrido et al. 2023; Wang et al. 2024/2025): for each transformation family
alone, pairs (x, g_θ(x)) are built with the path semantics of `pipeline.path` (reference pipeline):

    rotation, translation, color, blur:  x = A2(I) (random crop + flip), x' = g_θ(x) with only that family active
    crop:  x = the whole image resized, x' = A2(I) without flip         target: the crop box (y0, x0, h, w)
    flip:  x = A2(I) unflipped,         x' = the same crop, flipped when flip2 = 1     target: flip2

The frozen backbone embeds both images of every pair (once, in batches), a 3-layer MLP (1024 hidden,
ReLU) regresses the family's θ entries (`pipeline.path.FAMILY_FIELDS`) from [f(x), f(x')], and R² is
measured on pairs from held-out images (the split is by source image, never by pair). Two R² are reported:

    r2       = mean_j [1 - Σ_i (y_ij - ŷ_ij)² / Σ_i (y_ij - ȳ_j)²]     per-dimension, uniform average
                                                                     (scikit-learn's r2_score)
    r2_sie   = 1 - Σ_ij (y_ij - ŷ_ij)² / Σ_ij (y_ij - ȳ)²,  ȳ = the mean of all entries   (SIE's code)

r2_sie weights each θ entry by its raw scale (translation in pixels outweighs nothing else; for colour,
brightness/contrast/saturation at ±0.4 outweigh hue at ±0.1); both equal the usual R² for 1-D families.
Invariance: a linear classifier (softmax regression on standardised features) fitted on the train
split and scored on the val split, and DINO's weighted k-NN (cosine, k = 20, T = 0.07) as a cheap check.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # `python train/probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.path import FAMILIES, FAMILY_FIELDS, IDX, PathConfig, sample_theta  # noqa: E402

TRANSFORMS = ("rotation", "translation", "color", "blur", "crop", "flip")
PARTS = ("all", "inv", "eq")


class ProbeError(ValueError):
    """Bad input to a probe; the message is one actionable line."""


# --------------------------------------------------------------------------------------------- metrics


def r2_per_dim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """scikit-learn's r2_score (multioutput='uniform_average'): (N, P), (N, P) -> scalar.

    A dimension with no variance scores 1 if predicted exactly and 0 otherwise (as scikit-learn does).
    """
    pred, target = pred.double().reshape(len(pred), -1), target.double().reshape(len(target), -1)
    ss_res = ((target - pred) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).double())
    return float(r2.mean())


def r2_global(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SIE's R²: one global mean over every entry of the target. (N, P), (N, P) -> scalar."""
    pred, target = pred.double(), target.double()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1 - ((target - pred) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


# ------------------------------------------------------------------------------------ the regressors


def mlp(d_in: int, d_out: int, hidden: int = 1024) -> nn.Sequential:
    """The probe head of SIE's eval: Linear-ReLU-Linear-ReLU-Linear; the last layer starts at zero, so
    an untrained head predicts the (standardised) training mean, R² ≈ 0, never worse."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, d_out))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


@dataclass
class FitConfig:
    """How a probe head is trained. The defaults are the papers' protocol (hidden 1024); a CPU demo can
    trade it for speed with a narrower head (`--hidden 256`), which is reported with the results."""

    hidden: int = 1024
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 15  # epochs without improvement on the inner validation split before stopping
    val_fraction: float = 0.15  # of the training groups, held out for early stopping
    seed: int = 0


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _group_split(groups: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask of rows whose group (source image) falls in a random `fraction` of the groups."""
    ids = groups.unique()
    n_out = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    held = ids[torch.randperm(len(ids), generator=gen)[:n_out]]
    return torch.isin(groups, held)


def fit_predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, loss_fn, cfg: FitConfig,
                groups: torch.Tensor) -> torch.Tensor:
    """Train `model` on (x, y) with AdamW and early stopping on held-out groups; -> predictions on x_test.

    x, y, x_test live on the device the model should train on. Minibatches of cfg.batch_size; the best
    epoch by validation loss (epoch 0, the untrained model, included) is the one that predicts.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    is_val = _group_split(groups.cpu(), cfg.val_fraction, gen).to(x.device)
    x_fit, y_fit, x_val, y_val = x[~is_val], y[~is_val], x[is_val], y[is_val]
    model = model.to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def val_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x_val), y_val))

    best, best_state, stale = val_loss(), copy.deepcopy(model.state_dict()), 0
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x_fit), generator=gen).to(x.device).split(cfg.batch_size):
            loss = loss_fn(model(x_fit[idx]), y_fit[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        current = val_loss()
        if current < best - 1e-6:
            best, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        return model(x_test)


def regress_r2(f1: torch.Tensor, f2: torch.Tensor, theta: torch.Tensor, groups: torch.Tensor,
               test_fraction: float = 0.25, fit: FitConfig | None = None) -> dict:
    """R² of θ regressed from [f1, f2] by the 3-layer MLP, on pairs of held-out groups.

    f1, f2: (N, D) embeddings of x and g_θ(x); theta: (N, P) the family's θ entries; groups: (N,) the
    source image of each pair (train/test never share an image). -> {"r2", "r2_sie", "n_train", "n_test"}.
    """
    fit = fit or FitConfig()
    if len(groups.unique()) < 3:
        raise ProbeError(f"the equivariance probe needs pairs from at least 3 images, got {len(groups.unique())}")
    gen = torch.Generator().manual_seed(fit.seed + 1)
    is_test = _group_split(groups.cpu(), test_fraction, gen).to(f1.device)
    x = torch.cat([f1, f2], dim=1).float()  # (N, 2D)
    y = theta.float().to(f1.device)
    x_tr, x_te = _standardise(x[~is_test], x[is_test])
    y_tr, y_te = _standardise(y[~is_test], y[is_test])
    torch.manual_seed(fit.seed)
    pred = fit_predict(mlp(x.shape[1], y.shape[1], fit.hidden), x_tr, y_tr, x_te, F.mse_loss, fit, groups[~is_test.cpu()])
    # Back to θ units (standardising is affine per dimension, so r2 is unchanged by it, r2_sie is not).
    mean, std = y[~is_test].mean(0), y[~is_test].std(0).clamp_min(1e-6)
    pred, y_test = pred * std + mean, y[is_test]
    return {"r2": r2_per_dim(pred.cpu(), y_test.cpu()), "r2_sie": r2_global(pred.cpu(), y_test.cpu()),
            "n_train": int((~is_test).sum()), "n_test": int(is_test.sum())}


def linear_top1(f_train: torch.Tensor, y_train: torch.Tensor, f_val: torch.Tensor, y_val: torch.Tensor,
                fit: FitConfig | None = None) -> float:
    """Top-1 accuracy of softmax regression fitted on standardised train features, scored on val."""
    fit = fit or FitConfig(epochs=100, batch_size=1024, lr=1e-3, weight_decay=1e-4, patience=10)
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    x_tr, x_va = _standardise(f_train.float(), f_val.float())
    head = nn.Linear(x_tr.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    # Early stopping needs held-out rows; single samples are their own groups here.
    groups = torch.arange(len(x_tr))
    pred = fit_predict(head, x_tr, y_train.to(x_tr.device), x_va, F.cross_entropy, fit, groups)
    return float((pred.argmax(1).cpu() == y_val.cpu()).float().mean())


def knn_top1(f_train: torch.Tensor, y_train: torch.Tensor, f_val: torch.Tensor, y_val: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train = F.normalize(f_train.float(), dim=1)
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(f_val), chunk):
        val = F.normalize(f_val[start:start + chunk].float(), dim=1)
        sim, idx = (val @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(val), n_classes, device=val.device)
        votes.scatter_add_(1, y_train.to(val.device)[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1).cpu() == y_val[start:start + chunk].cpu()).sum())
    return correct / len(f_val)


# ------------------------------------------------------------------------------------------------ data


def read_split(data: str | Path, split: str, limit: int = 0) -> list[tuple[bytes, int]]:
    """(JPEG bytes, class index) of every sample in SHARDS/{split}-*.tar, in shard order; `limit` > 0
    keeps the first `limit` samples (shards are shuffled when written, so this is a random subset)."""
    folder = Path(data)
    shards = sorted(folder.glob(f"{split}-*.tar"))
    if not shards:
        found = sorted({p.name.split("-")[0] for p in folder.glob("*-*.tar")})
        raise ProbeError(f"{folder}: no {split}-*.tar shards (splits found: {', '.join(found) or 'none'}); "
                         f"convert a dataset with `python -m pipeline.convert`")
    samples: list[tuple[bytes, int]] = []
    for shard in shards:
        try:
            with tarfile.open(shard, mode="r:") as tar:
                pending: dict[str, dict[str, bytes]] = {}
                for info in tar:
                    key, _, ext = info.name.rpartition(".")
                    pending.setdefault(key, {})[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as err:
            raise ProbeError(f"{shard}: cannot read shard ({err})") from None
        for key, parts in pending.items():
            if "jpg" not in parts:
                raise ProbeError(f"{shard}: sample {key!r} has no .jpg")
            label = parts.get("cls", b"-1").decode("ascii", "replace").strip()
            samples.append((parts["jpg"], int(label) if label.lstrip("-").isdigit() else -1))
            if limit and len(samples) >= limit:
                return samples
    return samples


def make_pairs(samples: list[tuple[bytes, int]], family: str, cfg: PathConfig, size: int, per_image: int,
               seed: int = 0, chunk: int = 64):
    """Yield (x1, x2, theta, group) in chunks of `chunk` source images for one transformation family.

    x1, x2: (b, 3, size, size) in [0, 1]; theta: (b, p) the family's θ entries; group: (b,) the index of
    each pair's source image. `per_image` pairs per image, each with its own θ; deterministic in seed.
    """
    from pipeline.reference import apply_g, crop_resize, decode

    fields = [IDX[name] for name in FAMILY_FIELDS[family]]
    # Only this family's g is active (crop/flip activate none: they live in the A2 part of θ).
    cfg = replace(cfg, transforms=(family,) if family in FAMILIES else ())
    gen = torch.Generator().manual_seed(seed * 1000 + TRANSFORMS.index(family))
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0])
    for start in range(0, len(samples), chunk):
        x1, x2, thetas, groups = [], [], [], []
        for i, (jpg, _) in enumerate(samples[start:start + chunk], start=start):
            img = decode(jpg)  # (3, H, W) in [0, 1]
            theta = sample_theta(cfg, torch.tensor([list(img.shape[-2:])] * per_image), gen)  # (n, P)
            for t in theta:
                box, flip = t[IDX["crop2_y0"]:IDX["crop2_w"] + 1], bool(t[IDX["flip2"]] > 0.5)
                if family == "crop":
                    a, b = crop_resize(img, whole, False, size), crop_resize(img, box, False, size)
                elif family == "flip":
                    a, b = crop_resize(img, box, False, size), crop_resize(img, box, flip, size)
                else:
                    a = crop_resize(img, box, flip, size)
                    b = apply_g(a, t, cfg)
                x1.append(a)
                x2.append(b)
            thetas.append(theta[:, fields])
            groups.append(torch.full((per_image,), i))
        yield torch.stack(x1), torch.stack(x2), torch.cat(thetas), torch.cat(groups)


# ---------------------------------------------------------------------------------------- backbones


class Embedder(nn.Module):
    """A frozen timm ViT (+ the split head when known): images in [0, 1] -> pooled features by part.

    all: the backbone's tokens pooled (mean of the patch tokens, or the class token): what a user of
         the exported timm model gets.  inv / eq: the head's z_inv / z_eq channels, pooled the same way.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, d_inv: int, pool: str,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ProbeError(f"--pool must be mean or cls, got {pool!r}")
        if pool == "cls" and not getattr(backbone, "has_class_token", False):
            raise ProbeError("--pool cls: this backbone has no class token; use --pool mean")
        self.backbone, self.head, self.d_inv, self.pool = backbone.eval(), head, d_inv, pool
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.parts = ("all",) if head is None else (("all", "inv") if d_inv >= head.out_features
                                                    else ("all", "inv", "eq"))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.backbone.forward_features((x - self.mean) / self.std)  # (B, prefix + N, C)
        n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, n_prefix:].mean(1)  # (B, C)
        out = {"all": pooled}
        if self.head is not None:
            # Mean pooling commutes with the linear head: head(mean of tokens) = mean of head(tokens).
            z = self.head(pooled)  # (B, d_patch)
            out["inv"], out["eq"] = z[:, :self.d_inv], z[:, self.d_inv:]
        return out


# ------------------------------------------------------------------------------------------ drivers


def _device(name: str = "auto") -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False, dynamic_ncols=True)


def _as_parts(out) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"all": out}


@torch.no_grad()
def embed_pairs(model: nn.Module, pairs, device: torch.device, batch_size: int, bar=None):
    """Run `model` on both images of every pair, in batches -> ({part: f1}, {part: f2}, theta, groups)."""
    f1: dict[str, list] = {}
    f2: dict[str, list] = {}
    thetas, groups = [], []
    for x1, x2, theta, group in pairs:
        for start in range(0, len(x1), batch_size):
            for images, store in ((x1, f1), (x2, f2)):
                out = _as_parts(model(images[start:start + batch_size].to(device, non_blocking=True)))
                for part, feats in out.items():
                    store.setdefault(part, []).append(feats.float())
        thetas.append(theta)
        groups.append(group)
        if bar is not None:
            bar.update(len(group.unique()))
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return cat(f1), cat(f2), torch.cat(thetas), torch.cat(groups)


def equivariance(model: nn.Module, samples: list[tuple[bytes, int]], cfg: PathConfig, size: int,
                 transforms: tuple[str, ...] = TRANSFORMS, parts: tuple[str, ...] = ("all",), per_image: int = 16,
                 device: torch.device | None = None, batch_size: int = 256, seed: int = 0,
                 fit: FitConfig | None = None, quiet: bool = False) -> dict:
    """The equivariance probe -> {transformation: {part: {"r2", "r2_sie", "n_train", "n_test"}}}.

    model maps (B, 3, size, size) images in [0, 1] to features: a tensor (B, D), which is part "all",
    or a dict {part: (B, D)} such as `Embedder` returns.
    """
    device = device or _device()
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ProbeError(f"unknown transformation {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
    model = model.to(device).eval()
    results: dict = {}
    bar = _progress(len(samples) * len(transforms), "embedding pairs", quiet)
    for family in transforms:
        pairs = make_pairs(samples, family, cfg, size, per_image, seed)
        f1, f2, theta, groups = embed_pairs(model, pairs, device, batch_size, bar)
        missing = [p for p in parts if p not in f1]
        if missing:
            raise ProbeError(f"--part {missing[0]}: this backbone has only the parts {', '.join(f1)} "
                             f"(inv/eq need the split head: a training checkpoint or an export with head)")
        results[family] = {part: regress_r2(f1[part], f2[part], theta, groups, fit=fit) for part in parts}
    bar.close()
    return results


def center_views(samples: list[tuple[bytes, int]], size: int, chunk: int = 256):
    """Yield (images (b, 3, size, size) in [0, 1], labels (b,)): the largest centred square, resized."""
    from pipeline.reference import crop_resize, decode

    for start in range(0, len(samples), chunk):
        images, labels = [], []
        for jpg, label in samples[start:start + chunk]:
            img = decode(jpg)
            h, w = img.shape[-2:]
            side = min(h, w)
            box = torch.tensor([(h - side) / 2 / h, (w - side) / 2 / w, side / h, side / w])
            images.append(crop_resize(img, box, False, size))
            labels.append(label)
        yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def embed_views(model: nn.Module, samples, size: int, device: torch.device, batch_size: int, bar=None):
    """Embed the centred view of every sample -> ({part: (N, D)}, labels (N,))."""
    feats: dict[str, list] = {}
    labels = []
    for images, label in center_views(samples, size):
        for start in range(0, len(images), batch_size):
            for part, f in _as_parts(model(images[start:start + batch_size].to(device))).items():
                feats.setdefault(part, []).append(f.float())
        labels.append(label)
        if bar is not None:
            bar.update(len(label))
    return {part: torch.cat(f) for part, f in feats.items()}, torch.cat(labels)


def linear(model: nn.Module, train: list[tuple[bytes, int]], val: list[tuple[bytes, int]], size: int,
           parts: tuple[str, ...] = ("all",), device: torch.device | None = None, batch_size: int = 256,
           k: int = 20, quiet: bool = False) -> dict:
    """Linear-probe and k-NN top-1 -> {part: {"linear_top1", "knn_top1", "n_train", "n_val"}}."""
    device = device or _device()
    model = model.to(device).eval()
    for name, split in (("train", train), ("val", val)):
        if not split:
            raise ProbeError(f"the {name} split is empty; the linear probe needs labelled train and val shards")
        if any(label < 0 for _, label in split):
            raise ProbeError(f"the {name} split has unlabelled samples (cls -1); the linear probe needs labels")
    bar = _progress(len(train) + len(val), "embedding images", quiet)
    f_tr, y_tr = embed_views(model, train, size, device, batch_size, bar)
    f_va, y_va = embed_views(model, val, size, device, batch_size, bar)
    bar.close()
    results = {}
    for part in parts:
        if part not in f_tr:
            raise ProbeError(f"--part {part}: this backbone has only the parts {', '.join(f_tr)}")
        results[part] = {"linear_top1": linear_top1(f_tr[part], y_tr, f_va[part], y_va),
                         "knn_top1": knn_top1(f_tr[part], y_tr, f_va[part], y_va, k=k),
                         "n_train": len(y_tr), "n_val": len(y_va)}
    return results
