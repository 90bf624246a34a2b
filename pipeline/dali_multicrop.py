"""Multi-crop in the DALI graph: the L local crops of pipeline/multicrop.py, rendered from the decoded
image node next to the views, on the CPU or the GPU.

    params = sample_local_params(H, W, mc)                  # (L, LOCAL_DIM) per sample, in the graph
    local = local_crops(img, params, H, W, mc, data, dev)   # (L, 3, h, w) normalised, CHW
    masks = batch_masks(mc, data.seed, epoch, rank, batch_index, B)   # on the host, (B, 2, N)

Parameters. As the views' θ (pipeline/dali.py), the local crops' parameters are drawn inside the graph
by fn.random with the pipeline's seed, by the rule of `multicrop.sample_local_params`: the same
distribution (random-resized-crop boxes by `dali_ops.sample_crop`, the twin of `path.sample_crop`; flip,
jitter, greyscale and blur coins with the recipe's probabilities; jitter and σ uniform in its ranges),
not the same numbers as the reference loader, which seeds by sample key. For parity tests the graph
takes given parameters instead (`render_local_batch`), so DALI renders exactly what the reference
renders (`multicrop.render_local_crops`).

Rendering. The pixel steps are pipeline/dali.py's: `crop_resize` reads the local box and flip from
the crop1/flip1 entries of a parameter row, `apply_g` runs the colour step and then the blur step
(each under its own one-family PathConfig, `multicrop.photometric_configs`), and between them the
greyscale flag blends the pixels with torchvision's grey weights (one per-pixel 3×3 map).

Masks do not depend on pixels, so the DALI loader draws them on the host per batch; without sample keys
they are seeded by (seed, epoch, rank, batch index, position in the batch).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.batch import DataConfig

# The calls into the view graph, kept in one place (pipeline/dali.py owns the DALI pixel semantics).
from pipeline.dali_ops import GREY as GREY_WEIGHTS
from pipeline.dali_ops import apply_g, crop_resize, sample_crop
from pipeline.multicrop import (
    COLOUR,
    GREY,
    LOCAL_DIM,
    LOCAL_FIELDS,
    MultiCropConfig,
    local_crop_config,
    photometric_configs,
    sample_masks,
    validate,
)

# fn.random draws per local crop, in this order: four coins, then the jitter and σ uniforms.
COINS = ("jitter", "blur", "flip1", "grey")


def _fn():
    from nvidia.dali import fn, types  # DALI is optional: imported when a graph is built

    return fn, types


def _const(values):
    _, types = _fn()
    return types.Constant(np.asarray(values, dtype=np.float32), device="cpu")


def _coin_p(mc: MultiCropConfig) -> list[float]:
    return [mc.jitter_p, mc.blur_p, mc.flip_p, mc.grey_p]


def sample_local_params(H, W, mc: MultiCropConfig):
    """The local crops' parameters of one sample, drawn in the graph -> (L, LOCAL_DIM) float32 (CPU).

    H, W: the source size (CPU float scalars). Rows in the `multicrop.LOCAL_FIELDS` layout.
    """
    fn, types = _fn()
    crop_rule = local_crop_config(mc)
    lo = np.array([-getattr(mc, n) for n in COLOUR] + [mc.blur_sigma[0]])
    hi = np.array([getattr(mc, n) for n in COLOUR] + [mc.blur_sigma[1]])
    rows = []
    for _ in range(mc.n_local):
        u = fn.random.uniform(range=[0.0, 1.0], shape=[len(COINS) + len(lo)])
        coin = fn.cast(u[0 : len(COINS)] < _const(_coin_p(mc)), dtype=types.FLOAT)  # (4,) 1 = apply
        value = u[len(COINS) :] * _const(hi - lo) + _const(lo)  # (5,) jitter δs, then σ
        zero = u[0] * 0.0
        field = {name: zero for name in LOCAL_FIELDS}
        for i, name in enumerate(COLOUR):
            field[name] = coin[0] * value[i]
        field["blur_sigma"] = coin[1] * value[len(COLOUR)]  # 0: no blur
        field["flip1"], field["grey"] = coin[2], coin[3]
        y0, x0, h, w = sample_crop(H, W, crop_rule)
        field.update(crop1_y0=y0 / H, crop1_x0=x0 / W, crop1_h=h / H, crop1_w=w / W)
        field.update(crop2_h=zero + 1.0, crop2_w=zero + 1.0)  # unused: the whole image
        rows.append(fn.stack(*[field[name] for name in LOCAL_FIELDS]))
    return fn.stack(*rows)


def greyscale(x, flag):
    """torchvision's rgb_to_grayscale (3 channels) where flag > 0.5, else the identity; HWC."""
    fn, types = _fn()
    flag = fn.cast(flag > 0.5, dtype=types.FLOAT)  # the reference's rule for the flag
    eye, grey_rows = np.eye(3), np.tile(np.asarray(GREY_WEIGHTS), (3, 1))
    return fn.coord_transform(x, M=flag * _const(grey_rows) + (1.0 - flag) * _const(eye))  # per-pixel 3×3


def local_crops(img, params, H, W, mc: MultiCropConfig, data: DataConfig, dev: str):
    """Decoded image (HWC uint8 on dev) + params (L, LOCAL_DIM) on the CPU -> (L, 3, h, w) float32,
    normalised with data.mean/std, CHW; None when mc.n_local is 0."""
    fn, types = _fn()
    if mc.n_local == 0:
        return None
    size = mc.local_size
    colour, blur = photometric_configs(mc)
    norm = {"mean": list(data.mean), "std": list(data.std), "output_layout": "CHW", "dtype": types.FLOAT}
    crops = []
    for i in range(mc.n_local):
        p = params[i]
        x = crop_resize(img, p, H, W, 1, size, dev)  # the local box and flip are p's crop1 and flip1
        x = apply_g(x, p, 1.0, size, colour, dev)
        x = greyscale(x, p[GREY])
        x = apply_g(x, p, 1.0, size, blur, dev)
        crops.append(fn.crop_mirror_normalize(x, **norm))
    return fn.stack(*crops)


def build_local_pipeline(
    images,
    batch_size: int,
    mc: MultiCropConfig,
    data: DataConfig,
    device: str = "cpu",
    device_id: int | None = None,
    params=None,
    seed: int = 0,
):
    """A pipeline of the local crops alone, over external images -> outputs (params, local).

    images: a callable returning a batch of HWC uint8 arrays; params: a callable returning a batch of
    (L, LOCAL_DIM) float32 arrays, or None to draw them in the graph (as the loader's graph would).
    """
    from nvidia.dali import Pipeline, fn, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    validate(mc)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=1,
        device_id=device_id if device == "gpu" else None,
        seed=seed,
        prefetch_queue_depth=1,
    )
    with pipe:
        img = fn.external_source(source=images, batch=True, layout="HWC", dtype=types.UINT8)
        shape = fn.cast(img.shape(), dtype=types.FLOAT)
        H, W = shape[0], shape[1]
        if params is None:
            theta = sample_local_params(H, W, mc)
        else:
            theta = fn.external_source(source=params, batch=True, dtype=types.FLOAT)
        img = img.gpu() if device == "gpu" else img
        local = local_crops(img, theta, H, W, mc, data, device)
        pipe.set_outputs(theta, local)
    return pipe


def render_local_batch(
    images: list[torch.Tensor],
    mc: MultiCropConfig,
    data: DataConfig,
    params: list[torch.Tensor] | None = None,
    device: str = "cpu",
    device_id: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the local-crop graph on given pixels -> (params (B, L, LOCAL_DIM), local (B, L, 3, h, w)) on the CPU.

    images: B decoded (3, H, W) uint8 tensors (sizes may differ); params: B (L, LOCAL_DIM) rows to
    render (what the parity tests compare with `multicrop.render_local_crops`), or None to draw them in
    the graph with `seed`.
    """
    if mc.n_local == 0:
        raise ValueError("render_local_batch: multicrop.n_local is 0, there are no local crops to render")
    if params is not None and (
        len(params) != len(images) or any(tuple(p.shape) != (mc.n_local, LOCAL_DIM) for p in params)
    ):
        raise ValueError(
            f"render_local_batch: {len(images)} images need {len(images)} params of shape "
            f"({mc.n_local}, {LOCAL_DIM})"
        )
    hwc = [np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]
    feed = (
        None if params is None else [np.ascontiguousarray(p.detach().cpu().float().numpy()) for p in params]
    )
    pipe = build_local_pipeline(
        lambda: hwc, len(images), mc, data, device, device_id, None if feed is None else (lambda: feed), seed
    )
    pipe.build()
    # one batch, no reader: run the pipeline directly, as dali.render_batch does
    theta, local = (
        torch.from_numpy(np.array((t.as_cpu() if device == "gpu" else t).as_array())) for t in pipe.run()
    )
    return theta, local


def batch_masks(
    mc: MultiCropConfig, seed: int, epoch: int, rank: int, batch_index: int, batch_size: int
) -> torch.Tensor | None:
    """iBOT's masks for one DALI batch -> (B, 2, N) bool, or None unless mc.masks."""
    if not mc.masks:
        return None
    return torch.stack([sample_masks(mc, seed, epoch, rank, batch_index, i) for i in range(batch_size)])
