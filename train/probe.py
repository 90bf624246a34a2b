"""Frozen-backbone probes: how much transformation information the features keep, and how invariant they are.

    python train/probe.py equivariance --backbone RUN/ckpt/last.pt [--data SHARDS] [--split val]
        [--part all|inv|eq[,...]] [--pool mean|cls] [--transforms rotation,color,blur,translation,crop,flip]
        [--samples N] [--out results.json]
    python train/probe.py linear --backbone backbone.safetensors --data SHARDS [--out results.json]

`--backbone` is a training checkpoint (model state + resolved config; every part available) or a
`train/export.py` export (`backbone.safetensors` + its JSON; `--part inv|eq` needs an export that
carries the head). Without `--data` the probes read the embedded demo photos.

Equivariance protocol (SIE, Garrido et al. 2023; Wang et al. 2024/2025): for each transformation family
alone, pairs (x, x') are rendered by the reference pipeline (`pipeline.reference`) with the θ semantics
of `pipeline.path`, θ drawn from the protocol's ranges (`PathConfig()` defaults: the path paper's
Table 2, pixels at 224 px scaled to the probe resolution), whatever ranges the backbone was trained with:

    rotation, translation, color, blur:  x = the centre view (largest centred square), x' = g_θ(x) with
                                         only that family active; target: its θ entries
    crop:  x = the whole image, x' = an A2 crop (unflipped)       target: the box (y0, x0, h, w) of A2
    flip:  x = the whole image, x' = an A2 crop, mirrored when flip2 = 1                 target: flip2

Each image gives `--samples` pairs (own θ each) and its x is embedded once. The frozen backbone
embeds x and x', a 3-layer MLP (1024 hidden, ReLU) regresses the family's θ entries
(`pipeline.path.FAMILY_FIELDS`) from [f(x), f(x')], early-stopped on held-out training images, and
R² is measured on pairs of held-out images (the split is by source image, never by pair):

    r2       = mean_j [1 - Σ_i (y_ij - ŷ_ij)² / Σ_i (y_ij - ȳ_j)²]     per-dimension, uniform average
                                                                     (scikit-learn's r2_score)
    r2_sie   = 1 - Σ_ij (y_ij - ŷ_ij)² / Σ_ij (y_ij - ȳ)²,  ȳ = the mean of all entries   (SIE's code)

Both equal the usual R² for 1-D families (rotation, blur, flip). For several dimensions r2_sie
weights each θ entry by its raw scale and credits predicting each dimension's own mean: for crop,
whose box entries have different means (h, w ≈ 0.7, y0, x0 ≈ 0.15), it is near 0.9 even for a
backbone that knows nothing; read r2 there.

Invariance: a linear classifier (softmax regression on standardised features) fitted on the train
split and scored on the val split, and DINO's weighted k-NN (cosine, k = 20, T = 0.07) as a cheap check.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # `python train/probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.batch import DataConfig
from pipeline.errors import ProbeError
from pipeline.path import FAMILIES, FAMILY_FIELDS, IDX, PathConfig, sample_theta
from pipeline.reference import DataError, apply_g, crop_resize, decode, read_shard, split_shards

TRANSFORMS = ("rotation", "translation", "color", "blur", "crop", "flip")
PARTS = ("all", "inv", "eq")


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
    net = nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )
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


def fit_predict(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    loss_fn,
    cfg: FitConfig,
    groups: torch.Tensor,
) -> torch.Tensor:
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


def regress_r2(
    f1: torch.Tensor,
    f2: torch.Tensor,
    theta: torch.Tensor,
    groups: torch.Tensor,
    test_fraction: float = 0.25,
    fit: FitConfig | None = None,
) -> dict:
    """R² of θ regressed from [f1, f2] by the 3-layer MLP, on pairs of held-out groups.

    f1, f2: (N, D) embeddings of x and g_θ(x); theta: (N, P) the family's θ entries; groups: (N,) the
    source image of each pair (train/test never share an image). -> {"r2", "r2_sie", "n_train", "n_test"}.
    """
    fit = fit or FitConfig()
    if len(groups.unique()) < 3:
        raise ProbeError(
            f"the equivariance probe needs pairs from at least 3 images, got {len(groups.unique())}"
        )
    gen = torch.Generator().manual_seed(fit.seed + 1)
    is_test = _group_split(groups.cpu(), test_fraction, gen).to(f1.device)
    x = torch.cat([f1, f2], dim=1).float()  # (N, 2D)
    y = theta.float().to(f1.device)
    x_tr, x_te = _standardise(x[~is_test], x[is_test])
    (y_tr,) = _standardise(y[~is_test])
    torch.manual_seed(fit.seed)
    head = mlp(x.shape[1], y.shape[1], fit.hidden)
    pred = fit_predict(head, x_tr, y_tr, x_te, F.mse_loss, fit, groups[~is_test.cpu()])
    # Back to θ units (standardising is affine per dimension, so r2 is unchanged by it, r2_sie is not).
    mean, std = y[~is_test].mean(0), y[~is_test].std(0).clamp_min(1e-6)
    pred, y_test = pred * std + mean, y[is_test]
    return {
        "r2": r2_per_dim(pred.cpu(), y_test.cpu()),
        "r2_sie": r2_global(pred.cpu(), y_test.cpu()),
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
    }


def linear_top1(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    fit: FitConfig | None = None,
) -> float:
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


def knn_top1(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train = F.normalize(f_train.float(), dim=1)
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(f_val), chunk):
        val = F.normalize(f_val[start : start + chunk].float(), dim=1)
        sim, idx = (val @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(val), n_classes, device=val.device)
        votes.scatter_add_(1, y_train.to(val.device)[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1).cpu() == y_val[start : start + chunk].cpu()).sum())
    return correct / len(f_val)


# ------------------------------------------------------------------------------------------------ data


def read_split(data: str | Path, split: str, limit: int = 0) -> list[tuple[bytes, int]]:
    """(JPEG bytes, class index) of every sample in the split's shards (dataset.json's list), in shard
    order; `limit` > 0 keeps the first `limit` samples (shards are shuffled when written, so this is a
    random subset). Shards are read and checked by the reference pipeline's reader."""
    folder = Path(data)
    if not (folder / "dataset.json").is_file():
        raise ProbeError(f"{folder}: no {split}-*.tar shards (no dataset.json); "
                         "convert a dataset with `python -m pipeline.convert`")
    samples: list[tuple[bytes, int]] = []
    try:
        for shard, count in split_shards(folder, split):
            for sample in read_shard(shard, count):
                if "jpg" not in sample:
                    raise ProbeError(f"{shard}: sample {sample['__key__']!r} has no .jpg")
                label = sample.get("cls", b"-1").decode("ascii", "replace").strip()
                samples.append((sample["jpg"], int(label) if label.lstrip("-").isdigit() else -1))
                if limit and len(samples) >= limit:
                    return samples
    except (DataError, FileNotFoundError) as err:
        raise ProbeError(str(err)) from None
    return samples


def centre_box(hw: tuple[int, int]) -> torch.Tensor:
    """The largest centred square of an (H, W) image as a fractional box (y0, x0, h, w)."""
    h, w = hw
    side = min(h, w)
    return torch.tensor([(h - side) / 2 / h, (w - side) / 2 / w, side / h, side / w])


WHOLE = torch.tensor([0.0, 0.0, 1.0, 1.0])


def anchor_of(family: str) -> str:
    """Which view x of the image a family's pairs start from: "centre" for g, "whole" for crop/flip."""
    return "whole" if family in ("crop", "flip") else "centre"


def anchor_views(samples: list[tuple[bytes, int]], size: int, kinds=("centre", "whole"), chunk: int = 256):
    """Yield ({kind: (b, 3, size, size) in [0, 1]}, labels (b,)) for kinds "centre" (the largest centred
    square) and "whole" (the whole image, squashed to a square), chunk by chunk."""
    for start in range(0, len(samples), chunk):
        views: dict[str, list] = {kind: [] for kind in kinds}
        labels = []
        for i, (jpg, label) in enumerate(samples[start : start + chunk], start=start):
            img = decode(jpg, key=f"#{i}")  # (3, H, W) uint8
            for kind in kinds:
                box = centre_box(tuple(img.shape[-2:])) if kind == "centre" else WHOLE
                views[kind].append(crop_resize(img, box, False, size))
            labels.append(label)
        yield {kind: torch.stack(v) for kind, v in views.items()}, torch.tensor(labels)


def make_pairs(
    samples: list[tuple[bytes, int]],
    family: str,
    cfg: PathConfig,
    size: int,
    per_image: int,
    seed: int = 0,
    chunk: int = 64,
    device: torch.device | None = None,
):
    """Yield the transformed images of one family in chunks of `chunk` source images: (x2, theta, group).

    x2: (b, 3, size, size) in [0, 1], the second image of each pair; the first is the image's
    `anchor_of(family)` view (see `anchor_views`), the same for all of its pairs. theta: (b, p) the
    family's θ entries; group: (b,) the index of the source image. `per_image` pairs per image, each
    with its own θ; deterministic in seed. g runs on `device` (the GPU when probing there: it is the
    costly step); decoding and cropping stay on the CPU.
    """
    if family not in TRANSFORMS:
        raise ProbeError(f"unknown transformation {family!r}; choose from {', '.join(TRANSFORMS)}")
    fields = [IDX[name] for name in FAMILY_FIELDS[family]]
    # Only this family's g is active (crop/flip activate none: they live in the A2 part of θ).
    cfg = replace(cfg, transforms=(family,) if family in FAMILIES else ())
    gen = torch.Generator().manual_seed(seed * 1000 + TRANSFORMS.index(family))
    for start in range(0, len(samples), chunk):
        x2, thetas, groups = [], [], []
        for i, (jpg, _) in enumerate(samples[start : start + chunk], start=start):
            img = decode(jpg, key=f"#{i}")  # (3, H, W) uint8
            theta = sample_theta(cfg, torch.tensor([list(img.shape[-2:])] * per_image), gen)  # (n, P)
            boxes = theta[:, IDX["crop2_y0"] : IDX["crop2_w"] + 1]
            flips = theta[:, IDX["flip2"]] > 0.5
            if family == "crop":  # x = the whole image, x' = an A2 crop of it
                x2.append(torch.stack([crop_resize(img, box, False, size) for box in boxes]))
            elif family == "flip":  # x = the whole image, x' = an A2 crop, mirrored when flip2 = 1
                x2.append(torch.stack([crop_resize(img, box, flip, size) for box, flip in zip(boxes, flips)]))
            else:  # x = the centre view, x' = g_θ(x)
                x = crop_resize(img, centre_box(tuple(img.shape[-2:])), False, size)
                x2.append(
                    apply_g(
                        x[None].expand(per_image, -1, -1, -1).to(device or x.device).contiguous(), theta, cfg
                    )
                )
            thetas.append(theta[:, fields])
            groups.append(torch.full((per_image,), i))
        yield torch.cat(x2), torch.cat(thetas), torch.cat(groups)


# ---------------------------------------------------------------------------------------- backbones


class Embedder(nn.Module):
    """A frozen timm ViT (+ the split head when known): images in [0, 1] -> pooled features by part.

    all: the backbone's tokens pooled (mean of the patch tokens, or the class token): what a user of
         the exported timm model gets.  inv / eq: the head's z_inv / z_eq channels, pooled the same way.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        d_inv: int,
        pool: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ProbeError(f"--pool must be mean or cls, got {pool!r}")
        if pool == "cls" and not getattr(backbone, "has_class_token", False):
            raise ProbeError("--pool cls: this backbone has no class token; use --pool mean")
        self.backbone, self.head, self.d_inv, self.pool = backbone.eval(), head, d_inv, pool
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.parts = (
            ("all",)
            if head is None
            else (("all", "inv") if d_inv >= head.out_features else ("all", "inv", "eq"))
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.backbone.forward_features((x - self.mean) / self.std)  # (B, prefix + N, C)
        n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, n_prefix:].mean(1)  # (B, C)
        out = {"all": pooled}
        if self.head is not None:
            # Mean pooling commutes with the linear head: head(mean of tokens) = mean of head(tokens).
            z = self.head(pooled)  # (B, d_patch)
            out["inv"] = z[:, : self.d_inv]
            if "eq" in self.parts:
                out["eq"] = z[:, self.d_inv :]
        return out


@dataclass
class Loaded:
    """A backbone ready to probe and the data settings it was trained with."""

    model: Embedder
    data: DataConfig  # img_size and mean/std of training; aug = the protocol's ranges (PathConfig defaults)
    describe: str  # one line for the report: file, method, step


def load_backbone(path: str | Path, pool: str = "mean") -> Loaded:
    """A training checkpoint (`RUN/ckpt/*.pt`) or an export (`*.safetensors` + its JSON) -> Loaded."""
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"--backbone {path}: no such file")
    if path.suffix in (".pt", ".pth"):
        return _load_checkpoint(path, pool)
    if path.suffix == ".safetensors":
        return _load_export(path, pool)
    raise ProbeError(f"--backbone {path}: expected a training checkpoint (.pt) or an export (.safetensors)")


def _load_checkpoint(path: Path, pool: str) -> Loaded:
    from model import build_method
    from train.config import ConfigError, from_dict

    try:
        # The trainer's own files also hold RNG states (numpy objects): not loadable weights-only.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        ImportError,
        AttributeError,
    ) as err:
        raise ProbeError(
            f"--backbone {path}: not a readable torch checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ProbeError(
            f"--backbone {path}: not a train/main.py checkpoint (needs 'model' and 'config' entries)"
        )
    try:
        cfg = from_dict(state["config"])
        method = build_method(cfg.model, cfg.data)
    except (ConfigError, ValueError) as err:
        raise ProbeError(f"--backbone {path}: its saved config does not build a model ({err})") from None
    missing, unexpected = method.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ProbeError(
            f"--backbone {path}: weights do not match the saved config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    enc = method.encoder
    model = Embedder(enc.backbone, enc.head, enc.d_inv, pool, cfg.data.mean, cfg.data.std)
    data = DataConfig(img_size=cfg.data.img_size, mean=cfg.data.mean, std=cfg.data.std)
    step = state.get("step", "?")
    return Loaded(model, data, f"{path} ({cfg.model.method}, {cfg.model.backbone}, step {step})")


def _load_export(path: Path, pool: str) -> Loaded:
    """`train/export.py` output: timm-keyed weights, the JSON beside it (timm_name, timm_kwargs, mean,
    std) and, when exported `--with-head`, the head file and its split named in the JSON's "head"."""
    import timm
    from safetensors.torch import load_file

    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ProbeError(
            f"--backbone {path}: its description {meta_path.name} (written by train/export.py) "
            f"is missing beside it"
        )
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["timm_name"], dict(meta.get("timm_kwargs", {}))
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        backbone.load_state_dict(load_file(str(path)))
        head, d_inv = None, 0
        if meta.get("head"):
            weights = load_file(str(path.with_name(meta["head"]["file"])))
            head = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            head.load_state_dict(weights)
            d_inv = int(meta["head"]["d_inv"])
    except KeyError as err:
        raise ProbeError(
            f"--backbone {meta_path}: missing entry {err} (re-export with train/export.py)"
        ) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise ProbeError(f"--backbone {path}: unreadable export ({str(err).splitlines()[0]})") from None
    data = DataConfig(img_size=int(kwargs.get("img_size", 224)))
    if "mean" in meta and "std" in meta:
        data.mean, data.std = tuple(meta["mean"]), tuple(meta["std"])
    model = Embedder(backbone, head, d_inv, pool, data.mean, data.std)
    what = meta.get("method", "?")
    return Loaded(
        model,
        data,
        f"{path} ({what}, {name}, step {meta.get('step', '?')}{', with head' if head is not None else ''})",
    )


# ------------------------------------------------------------------------------------------ drivers


def _device(name: str = "auto") -> torch.device:
    return torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False, dynamic_ncols=True)


def _as_parts(out) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"all": out}


def _embed(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> dict:
    """model on `images` in batches -> {part: (N, D) float32 on device}."""
    out: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            for part, f in _as_parts(
                model(images[start : start + batch_size].to(device, non_blocking=True))
            ).items():
                out.setdefault(part, []).append(f.float())
    return {part: torch.cat(f) for part, f in out.items()}


def _cat(chunks: list[dict]) -> dict:
    return {part: torch.cat([c[part] for c in chunks]) for part in chunks[0]}


def embed_anchors(
    model: nn.Module,
    samples,
    size: int,
    device: torch.device,
    batch_size: int,
    bar=None,
    kinds=("centre", "whole"),
):
    """Embed every image's anchor views -> ({"centre": {part: (N, D)}, "whole": ...}, labels (N,))."""
    feats: dict[str, list] = {kind: [] for kind in kinds}
    labels = []
    for views, label in anchor_views(samples, size, kinds):
        for kind, images in views.items():
            feats[kind].append(_embed(model, images, device, batch_size))
        labels.append(label)
        if bar is not None:
            bar.update(len(label))
    return {kind: _cat(chunks) for kind, chunks in feats.items()}, torch.cat(labels)


def equivariance(
    model: nn.Module,
    samples: list[tuple[bytes, int]],
    cfg: PathConfig,
    size: int,
    transforms: tuple[str, ...] = TRANSFORMS,
    parts: tuple[str, ...] = ("all",),
    per_image: int = 16,
    device: torch.device | None = None,
    batch_size: int = 256,
    seed: int = 0,
    fit: FitConfig | None = None,
    quiet: bool = False,
) -> dict:
    """The equivariance probe -> {transformation: {part: {"r2", "r2_sie", "n_train", "n_test"}}}.

    model maps (B, 3, size, size) images in [0, 1] to features: a tensor (B, D), which is part "all",
    or a dict {part: (B, D)} such as `Embedder` returns. Each image's anchor views are embedded once
    and shared by all of its pairs; the transformed images are generated and embedded chunk by chunk.
    """
    device = device or _device()
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ProbeError(f"unknown transformation {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
    model = model.to(device).eval()
    bar = _progress(len(samples) * (1 + len(transforms)), "embedding", quiet)
    kinds = tuple(sorted({anchor_of(f) for f in transforms}))
    anchors, _ = embed_anchors(model, samples, size, device, batch_size, bar, kinds)
    have = anchors[kinds[0]]
    missing = [p for p in parts if p not in have]
    if missing:
        raise ProbeError(
            f"--part {missing[0]}: this backbone has only the parts {', '.join(have)} "
            f"(inv/eq need the split head: a training checkpoint or an export with head)"
        )
    results: dict = {}
    for family in transforms:
        chunks, thetas, groups = [], [], []
        for x2, theta, group in make_pairs(samples, family, cfg, size, per_image, seed, device=device):
            chunks.append(_embed(model, x2, device, batch_size))
            thetas.append(theta)
            groups.append(group)
            bar.update(len(group.unique()))
        f2, theta, group = _cat(chunks), torch.cat(thetas), torch.cat(groups)
        f1 = anchors[anchor_of(family)]
        for part in parts:
            if not (f1[part].isfinite().all() and f2[part].isfinite().all()):
                raise ProbeError(f"the backbone gave non-finite features (part {part}) on the {family} pairs")
        results[family] = {
            part: regress_r2(f1[part][group.to(device)], f2[part], theta, group, fit=fit) for part in parts
        }
    bar.close()
    return results


def linear(
    model: nn.Module,
    train: list[tuple[bytes, int]],
    val: list[tuple[bytes, int]],
    size: int,
    parts: tuple[str, ...] = ("all",),
    device: torch.device | None = None,
    batch_size: int = 256,
    k: int = 20,
    quiet: bool = False,
) -> dict:
    """Linear-probe and k-NN top-1 -> {part: {"linear_top1", "knn_top1", "n_train", "n_val"}}."""
    device = device or _device()
    model = model.to(device).eval()
    for name, split in (("train", train), ("val", val)):
        if not split:
            raise ProbeError(
                f"the {name} split is empty; the linear probe needs labelled train and val shards"
            )
        if any(label < 0 for _, label in split):
            raise ProbeError(
                f"the {name} split has unlabelled samples (cls -1); the linear probe needs labels"
            )
    bar = _progress(len(train) + len(val), "embedding", quiet)
    # The centre view (largest centred square) is the usual "resize + centre crop" evaluation view.
    (a_tr, y_tr), (a_va, y_va) = (
        embed_anchors(model, split, size, device, batch_size, bar, kinds=("centre",))
        for split in (train, val)
    )
    f_tr, f_va = a_tr["centre"], a_va["centre"]
    bar.close()
    results = {}
    for part in parts:
        if part not in f_tr:
            raise ProbeError(f"--part {part}: this backbone has only the parts {', '.join(f_tr)}")
        results[part] = {
            "linear_top1": linear_top1(f_tr[part], y_tr, f_va[part], y_va),
            "knn_top1": knn_top1(f_tr[part], y_tr, f_va[part], y_va, k=k),
            "n_train": len(y_tr),
            "n_val": len(y_va),
        }
    return results


# ------------------------------------------------------------------------------------------ the CLI


def format_equivariance(results: dict) -> str:
    """Rows = transformations, columns = parts; each cell 'r2 (r2_sie)'."""
    parts = list(next(iter(results.values())))
    head = f"{'transformation':<15}" + "".join(f"{f'{p}: r2 (sie)':>19}" for p in parts)
    lines = [head, "-" * len(head)]
    for family, by_part in results.items():
        cells = "".join(f"{by_part[p]['r2']:>11.3f} ({by_part[p]['r2_sie']:6.3f})" for p in parts)
        lines.append(f"{family:<15}{cells}")
    return "\n".join(lines)


def format_linear(results: dict) -> str:
    head = f"{'part':<6}{'linear top-1':>14}{'k-NN top-1':>12}"
    rows = [f"{p:<6}{r['linear_top1']:>14.3f}{r['knn_top1']:>12.3f}" for p, r in results.items()]
    return "\n".join([head, "-" * len(head), *rows])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="train/probe.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backbone", required=True, help="training checkpoint (.pt) or export (.safetensors)"
    )
    common.add_argument(
        "--data", default="", help="shard folder (pipeline.convert); default: the demo photos"
    )
    common.add_argument(
        "--part", default="", help="comma list of all,inv,eq; default: every part the backbone has"
    )
    common.add_argument("--pool", default="mean", choices=("mean", "cls"))
    common.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    common.add_argument("--batch-size", type=int, default=256)
    common.add_argument("--img-size", type=int, default=0, help="probe resolution; default: the training one")
    common.add_argument("--hidden", type=int, default=1024, help="probe MLP width (the papers: 1024)")
    common.add_argument("--epochs", type=int, default=100, help="probe training epochs (early-stopped)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default="", help="write the results as JSON here")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    eq = sub.add_parser("equivariance", parents=[common], help="R² of θ regressed from pair embeddings")
    eq.add_argument("--split", default="val", help="comma list of splits whose images make the pairs")
    eq.add_argument("--transforms", default=",".join(TRANSFORMS))
    eq.add_argument("--samples", type=int, default=16, help="pairs per image (each with its own θ)")
    eq.add_argument("--max-images", type=int, default=0, help="use at most this many images (0: all)")
    lin = sub.add_parser("linear", parents=[common], help="linear-probe and k-NN top-1")
    lin.add_argument("--train-split", default="train")
    lin.add_argument("--val-split", default="val")
    lin.add_argument("--max-train", type=int, default=0, help="at most this many train images (0: all)")
    lin.add_argument("--max-val", type=int, default=0, help="at most this many val images (0: all)")
    lin.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the probe `args` describes and return the results record (what --out writes)."""
    from pipeline.demo import ensure_demo_shards

    loaded = load_backbone(args.backbone, args.pool)
    data_dir = Path(args.data) if args.data else ensure_demo_shards()
    parts = tuple(p for p in args.part.split(",") if p) or loaded.model.parts
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ProbeError(f"--part {bad[0]!r}: choose from {', '.join(PARTS)}")
    size = args.img_size or loaded.data.img_size
    device = _device(args.device)
    fit = FitConfig(hidden=args.hidden, epochs=args.epochs, seed=args.seed)
    torch.manual_seed(args.seed)
    record = {
        "what": f"probe-{args.probe}",
        "backbone": loaded.describe,
        "data": str(data_dir),
        "config": {k: v for k, v in vars(args).items() if k not in ("probe",)} | {"img_size": size},
    }
    if args.probe == "equivariance":
        samples = [s for split in args.split.split(",") for s in read_split(data_dir, split)]
        if args.max_images:
            samples = samples[: args.max_images]
        transforms = tuple(t for t in args.transforms.split(",") if t)
        results = equivariance(
            loaded.model,
            samples,
            loaded.data.aug,
            size,
            transforms,
            parts,
            args.samples,
            device,
            args.batch_size,
            args.seed,
            fit,
            args.quiet,
        )
        record.update(images=len(samples), pairs_per_image=args.samples, results=results)
    else:
        train = read_split(data_dir, args.train_split, args.max_train)
        val = read_split(data_dir, args.val_split, args.max_val)
        results = linear(loaded.model, train, val, size, parts, device, args.batch_size, args.k, args.quiet)
        record.update(results=results)
    return record


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        record = run(args)
    except (ProbeError, DataError) as err:
        print(f"probe: error: {err}", file=sys.stderr)
        return 2
    print(f"{record['what']}: {record['backbone']}")
    if args.probe == "equivariance":
        print(
            f"pairs: {record['images']} images x {record['pairs_per_image']} from {record['data']} "
            f"({args.split}), {record['config']['img_size']} px; MLP hidden {args.hidden}; "
            f"R² on held-out images (sie = SIE's global-mean R²)"
        )
        print(format_equivariance(record["results"]))
        print(
            "R² near 1: θ can be read from the pair's features (equivariant); near 0 or below: the "
            "features ignore it (invariant). all = backbone, inv/eq = the split head's parts."
        )
    else:
        print(format_linear(record["results"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
