"""The science run: vicreg, path and xattn (each at the papers' λ = 1 and with a balanced λ) and
balanced path trained without the corner shortcut, pretrained side by side on the same real photos
for the same steps (paired: the same init and batches per training seed), then probed beside the
sanity baselines (random init, raw pixels).

    python -m bench.science --size cpu            # tiny ViT at 32 px, rotation only, 3 seeds (2 cores)
    python -m bench.science --size gpu            # ViT-S/16 at 112 px, one GPU
    python -m bench.science --size cpu --parts train --methods path --seeds 1    # one part at a time

Every part is resumable and skipped when done, so the same command continues an interrupted run:
  fetch   bench/science_data.sh fetches the photos (scikit-image wheel, Debian's opencv-doc and
          lomiri-wallpapers-16.04) and Fashion-MNIST into WORK/raw (`data.py`).
  data    random crops of the photos, labelled by source photo (train crops from 5/6 of the photos,
          val crops from the other 1/6), and Fashion-MNIST, converted into shards (`data.py`).
  train   one `train/main.py` run per (method, seed): its preset with the same resolution, batch, step
          count and schedule for every method (`sizes.py`, `runs.py`); train.json records the as-run lr.
  probe   right after each run: train.probe's ridge readout on the val photos' pairs (held out by
          source photo, K-fold CV, fold assignments shared by every run: paired), disc and no mask,
          token and 2x2-grid features, whole z and z_eq; the baselines once; the backbone gradient
          ratio and reconstruction diagnostics (`runs.py`); WORK/summary-partial.json after each.
  report  bench/results/science-<device>.json through bench._provenance.write_result with the summary
          keys of `report.py` (r2, r2_std, paired diff and diff_std against vicreg, baselines); the chart.
"""

from bench.science.data import _idx, fetch, is_val_photo, prepare_data, source_photos
from bench.science.report import COLOURS, r2_chart, report, summarise
from bench.science.runs import probe_run, run_dir, train_command, trained
from bench.science.sizes import METHODS, SIZES, Size

__all__ = [
    "COLOURS",
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
