"""DALI samples θ in its graph, the reference with `pipeline.path.sample_theta`: both read path.py's
tables, so each field must have the same distribution. Two-sample Kolmogorov-Smirnov test per field on a
few thousand draws (fixed seeds, so the outcome is deterministic), and a check that the test notices a
range that differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from pipeline import dali_available
from pipeline.path import IDX, THETA_FIELDS, PathConfig, active_families, g_ranges, sample_theta

N = 3000
SRC_HW = (240, 400)  # a landscape source: crops of every scale fit, tall ratios sometimes do not
P_MIN = 1e-3

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
pytestmark = NEEDS_DALI


def dali_thetas(cfg: PathConfig, n: int = N, batch: int = 1000, seed: int = 3) -> np.ndarray:
    """θ drawn by the DALI graph (`pipeline.dali.sample_theta`) for n samples of size SRC_HW: (n, P)."""
    from nvidia.dali import Pipeline, fn

    from pipeline.dali_ops import sample_theta as graph_theta

    hw = np.asarray(SRC_HW, dtype=np.float32)
    pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, seed=seed)
    with pipe:
        shape = fn.external_source(source=lambda: [hw] * batch, batch=True)
        pipe.set_outputs(graph_theta(shape[0], shape[1], cfg))
    pipe.build()
    return np.concatenate([np.array(pipe.run()[0].as_array()) for _ in range(n // batch)])


def path_thetas(cfg: PathConfig, n: int = N, seed: int = 3) -> np.ndarray:
    src = torch.tensor([SRC_HW] * n, dtype=torch.float64)
    return sample_theta(cfg, src, torch.Generator().manual_seed(seed)).numpy()


CONFIGS = {
    "defaults": PathConfig(),
    "se2-wide": PathConfig(
        transforms=("se2",),
        rot_deg=90.0,
        translate_px=4.0,
        crop_scale=(0.5, 1.0),
        crop_ratio=(0.5, 2.0),
        flip_p=0.2,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dali_theta_has_the_distribution_of_path_sample_theta(name):
    cfg = CONFIGS[name]
    dali, ref = dali_thetas(cfg), path_thetas(cfg)
    lo, hi = g_ranges(cfg)
    for i, field in enumerate(THETA_FIELDS):
        d, r = dali[:, i], ref[:, i]
        if field.startswith("flip"):
            sd = np.sqrt(cfg.flip_p * (1 - cfg.flip_p) * 2 / N)
            assert abs(d.mean() - r.mean()) < 4 * sd, f"{field}: flip rate {d.mean():.3f} vs {r.mean():.3f}"
            continue
        if i < len(lo) and lo[i] == hi[i]:  # an inactive family: identity in both
            assert not d.any() and not r.any(), field
            continue
        if i < len(lo):
            assert lo[i] <= d.min() and d.max() <= hi[i], f"{field}: DALI left [{lo[i]}, {hi[i]}]"
        p = ks_2samp(d, r).pvalue
        assert p > P_MIN, (
            f"{field}: KS p = {p:.2g}; DALI mean {d.mean():.4f} sd {d.std():.4f}, "
            f"path mean {r.mean():.4f} sd {r.std():.4f}"
        )
    assert set(active_families(cfg)) <= {"rotation", "translation", "color", "blur"}


def test_the_comparison_notices_a_different_range():
    dali = dali_thetas(PathConfig(rot_deg=45.0), n=2000)
    ref = path_thetas(PathConfig(rot_deg=35.0), n=2000)  # a range 22% narrower
    assert ks_2samp(dali[:, IDX["rot_deg"]], ref[:, IDX["rot_deg"]]).pvalue < P_MIN
