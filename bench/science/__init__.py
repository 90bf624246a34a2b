"""The science run: vicreg, sie, xattn and path pretrained side by side on the same real photos for
the same number of steps, then probed beside the sanity baselines (random init, raw pixels).

    python -m bench.science --size cpu            # tiny ViT at 32 px, rotation only, 2 seeds (2 cores)
    python -m bench.science --size gpu            # ViT-S/16 at 112 px, one GPU, in parts < 10 min
    python -m bench.science --size cpu --parts train --methods path --seeds 1    # one part at a time

Every part is resumable and skipped when done, so the same command continues an interrupted run:
  fetch   bench/science_data.sh fetches the photos (scikit-image wheel, Debian's opencv-doc and
          lomiri-wallpapers-16.04) and Fashion-MNIST into WORK/raw (`data.py`).
  data    random crops of the photos, labelled by source photo (train crops from 5/6 of the photos,
          val crops from the other 1/6), and Fashion-MNIST, converted into shards (`data.py`).
  train   one `train/main.py` run per (method, seed): its preset with the same resolution, batch, step
          count and schedule for every method; `path` also in a λ / reduction sweep (`runs.py`).
  probe   the equivariance probe of `train.probe` on each run (val photos' crops, held out by source
          photo, disc mask, ≥ 3 probe seeds; pooled, grid and token parts; signed and |φ|), the
          baselines once, the backbone gradient ratio and the reconstruction diagnostics (`runs.py`).
  report  bench/results/science-<device>.json through bench._provenance.write_result, with the
          summary r2.<method>.<family> / r2_std.<method>.<family> (mean, std over training seeds),
          r2.pixels.<family>, r2.random.<family>, seeds, pairs; the R² chart (`report.py`).
"""

from bench.science.data import _idx, fetch, is_val_photo, prepare_data, source_photos
from bench.science.report import COLOURS, r2_chart, report, summarise
from bench.science.runs import probe_run, run_dir, train_command, trained
from bench.science.sizes import FAMILIES, METHODS, SIZES, Size

__all__ = [
    "COLOURS",
    "FAMILIES",
    "METHODS",
    "SIZES",
    "Size",
    "_idx",
    "fetch",
    "is_val_photo",
    "prepare_data",
    "probe_run",
    "r2_chart",
    "report",
    "run_dir",
    "source_photos",
    "summarise",
    "train_command",
    "trained",
]
