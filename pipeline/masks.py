"""iBOT's block masks (a data rule: the loaders draw them with each batch, as DINOv2's collate does).

    masks = block_masks(2, (H, W), rng)  # (2, H·W) bool: one mask per global crop, row-major patches

Drawn with Python's `random.Random` so both loaders and the tests reproduce them draw for draw;
tested against iBOT's ImageFolderMask and DINOv2's MaskingGenerator (tests/model/test_dino.py).
"""

from __future__ import annotations

import math
import random

import torch

MASK_RATIOS = ((0.0, 0.0), (0.1, 0.5))  # iBOT: a crop is unmasked or masked U(0.1, 0.5), 1:1
MASK_ASPECT = 0.3  # iBOT / BEiT block masks: aspect ratio log-uniform in (0.3, 1/0.3)


def sample_mask_ratio(rng: random.Random, ranges: tuple[tuple[float, float], ...] = MASK_RATIOS) -> float:
    """iBOT's per-crop mask ratio: one value per range (uniform in it; a point range is its value),
    then one of those values at random. The default is iBOT's recipe (`pred_ratio 0 0.3,
    pred_ratio_var 0 0.2`): half the crops unmasked, half masked U(0.1, 0.5)."""
    drawn = [rng.uniform(low, high) if high > low else low for low, high in ranges]
    return rng.choice(drawn)


def block_mask(
    grid: tuple[int, int],
    n_masked: float,
    rng: random.Random,
    min_block: int | None = None,
    max_block: float | None = None,
    aspect: float = MASK_ASPECT,
) -> torch.Tensor:
    """BEiT-style block mask of about n_masked patches (never more), as iBOT and DINOv2 draw them.

    Rectangles of area U(min_block, remaining) and aspect ratio log-uniform in (aspect, 1/aspect) are
    added until n_masked patches are covered or 10 draws in a row add nothing (the cover can then fall
    a little short). min_block: smallest rectangle area, default iBOT's (min(H, W) // 3)²
    (DINOv2 uses 4); max_block: largest area per rectangle (DINOv2: half the grid), default unlimited.
    grid (H, W) -> (H, W) bool.
    """
    h_grid, w_grid = grid
    if min_block is None:
        min_block = (min(h_grid, w_grid) // 3) ** 2
    log_aspect = (math.log(aspect), -math.log(aspect))
    mask = torch.zeros(h_grid, w_grid, dtype=torch.bool)
    count = 0
    while count < n_masked:
        remaining = n_masked - count
        if max_block is not None:
            remaining = min(remaining, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            ratio = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if h >= h_grid or w >= w_grid:
                continue
            top, left = rng.randint(0, h_grid - h), rng.randint(0, w_grid - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:  # adds something, never past the target
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def block_masks(
    n_crops: int,
    grid: tuple[int, int],
    rng: random.Random,
    ranges: tuple[tuple[float, float], ...] = MASK_RATIOS,
) -> torch.Tensor:
    """iBOT's masks for n_crops global crops, each with its own ratio from sample_mask_ratio.
    -> (n_crops, H·W) bool, row-major patches (the order of the ViT's patch tokens)."""
    n = grid[0] * grid[1]
    rows = [block_mask(grid, sample_mask_ratio(rng, ranges) * n, rng).flatten() for _ in range(n_crops)]
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.bool)
