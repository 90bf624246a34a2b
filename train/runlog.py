"""What rank 0 writes into the run folder besides checkpoints: config.json with provenance,
metrics.jsonl (and TensorBoard events with run.tensorboard=true), and the reconstruction grid.

    with lock_run_folder(run_dir, env):   # one training per run folder; a second one is refused at once
    log = RunLog(run_dir, cfg, env, start_step, stop_step)   # a resume drops metrics rows past its step
    log.step(step, epoch, lr, terms, step_s, data_s, write=True)   # a metrics.jsonl row, the progress bar
    save_recon_grid(method, batch, mean, std, run_dir / "recon.png")  # view 1 | view 2 | targets | preds | |diff|

A write that fails mid-run (a full disk, a folder turned read-only) is one TrainingError line (`writing`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.diagnostics import difference_images
from pipeline.errors import ConfigError, TrainingError
from pipeline.folder_lock import hold
from train.config import Config, to_dict
from train.provenance import provenance

if TYPE_CHECKING:
    from train.distributed import Env

RUN_LOCK = ".train.lock"  # flock'ed by the training that writes the folder; names its pid, host, start


@contextlib.contextmanager
def lock_run_folder(run_dir: Path, env: Env) -> Iterator[None]:
    """Rank 0 holds run_dir's lock while the block runs (the converter's rule, pipeline/folder_lock.py):
    two trainings into one folder would interleave their metrics and overwrite each other's
    checkpoints. Collective: rank 0's refusal is every rank's error."""
    with contextlib.ExitStack() as held:
        error = None
        if env.main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(
                    hold(run_dir, RUN_LOCK, lambda holder: ConfigError(_busy(run_dir, holder)))
                )
            except ConfigError as err:
                error = str(err)
            except OSError as err:
                error = (
                    f"cannot write the run folder {run_dir}: {err.strerror or err}; pass a writable --out DIR"
                )
        if env.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ConfigError(error)
        yield


def _busy(run_dir: Path, holder: str) -> str:
    return (
        f"{run_dir} is being written by another training ({holder}); wait for it to end or pass "
        "another --out (was the same job submitted twice?)"
    )


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """An OSError while writing path mid-run (a full disk, a folder turned read-only) -> one line."""
    try:
        yield
    except OSError as err:
        raise TrainingError(
            f"cannot write {what} {path}: {err.strerror or err}; free some space or make the run folder "
            "writable, then continue the run with --resume auto (its checkpoints so far are kept)"
        ) from None


def drop_rows_after(metrics: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: the earlier rows of those steps go, as
    TensorBoard's purge_step drops their events; so does a row that a crash cut short."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (_step_of(line) or step + 1) <= step]  # rows start at step 1
    if len(kept) < len(lines):
        tmp = metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(metrics)


def _step_of(line: str) -> int | None:
    """A metrics row's step; None for a row cut short (no newline, not JSON)."""
    try:
        row = json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


@torch.no_grad()
def save_recon_grid(method: nn.Module, batch, mean, std, path: Path | None, rows: int = 8) -> bool:
    """One row per sample: view 1, view 2, the K targets, the K' predictions and |prediction -
    target| per step, un-normalised to [0, 1] at the target resolution. False when the method reconstructs nothing. path None: only
    take part in the reconstruction (the other ranks under FSDP)."""
    from torchvision.utils import save_image

    was_training = method.training
    method.eval()
    try:
        pred = method.reconstruct(batch)
    finally:
        method.train(was_training)
    if pred is None or path is None:
        return pred is not None
    n = min(rows, len(batch))
    size = pred.shape[-2:]
    views = [
        nn.functional.interpolate(
            v[:n].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        for v in (batch.view1, batch.view2)
    ]
    targets = method.targets(batch)[:n].float()  # what each prediction is scored against
    m = torch.tensor(mean, device=pred.device).view(1, 1, 3, 1, 1)
    s = torch.tensor(std, device=pred.device).view(1, 1, 3, 1, 1)
    # |prediction - its own target| in pixel units: a decoder that ignores the step shows it here
    diff = difference_images(pred[:n] * s, targets * s).clamp(0, 1)
    # (n, 3, Ht, Wt) x 2 + (n, K, ...) targets + (n, K', ...) predictions -> (n, 2 + K + K', 3, Ht, Wt)
    cells = torch.cat([torch.stack(views, 1), batch.targets[:n].float(), pred[:n].float()], 1)
    cells = torch.cat([(cells * s + m).clamp(0, 1), diff], 1)  # + (n, K', ...) differences
    with writing(path, "the reconstruction grid"):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(cells.flatten(0, 1).cpu(), path, nrow=cells.shape[1], padding=2, pad_value=1.0)
    return True


class RunLog:
    """Rank 0's progress bar, metrics.jsonl, config.json and (run.tensorboard) TensorBoard events;
    a no-op on other ranks."""

    def __init__(
        self, run_dir: Path, cfg: Config, env: Env, start: int, stop: int, as_run: dict | None = None
    ):
        """as_run: the schedule as it runs (peak_lr after scaling, steps, epochs, ...): into config.json
        and the first line printed, so that a run's effective lr is never a guess from base_lr."""
        self.env, self.batch, self.tb = env, cfg.data.batch_size, None
        if env.main and as_run:
            print(
                f"as run: peak lr {as_run['peak_lr']:.4g} ({cfg.optim.lr_scaling} scaling of base_lr "
                f"{cfg.optim.base_lr:g} to batch {as_run['global_batch']}), {as_run['steps']} steps = "
                f"{as_run['epochs']:g} epochs x {as_run['steps_per_epoch']} steps, warm-up "
                f"{as_run['warmup_steps']} steps; this process runs steps {start + 1}..{stop}",
                flush=True,
            )
        if env.main:
            prov = provenance(env.device)
            meta = {
                "git_sha": prov["git_sha"],
                "device": str(env.device),
                "device_name": prov["device"],
                "versions": prov["versions"],
                "kernels": kernel_path(env.device),
                "world_size": env.world_size,
                "as_run": as_run or {},
                "config": to_dict(cfg),
            }
            self.meta, self.config_json, self.choices = meta, run_dir / "config.json", {}
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                self.config_json.write_text(json.dumps(meta, indent=2) + "\n")
            except OSError as err:
                raise ConfigError(
                    f"cannot write the run folder {run_dir}: {err.strerror or err}; pass a writable --out DIR"
                ) from None
            self.metrics = run_dir / "metrics.jsonl"
            with writing(self.metrics, "the metrics log"):
                drop_rows_after(self.metrics, start)
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # train.checks.check made sure it imports

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        self.bar = tqdm(total=stop, initial=start, disable=not env.main, dynamic_ncols=True, unit="step")

    def step(
        self, step: int, epoch: int, lr: float, terms: dict, step_s: float, data_s: float, write: bool
    ) -> None:
        if not self.env.main:
            return
        ips = self.batch / max(step_s, 1e-9)
        self.bar.update(1)
        # The bar shows the headline terms; metrics.jsonl keeps every sub-term.
        self.bar.set_postfix_str(
            f"{ips:.0f} img/s "
            + " ".join(f"{k}={v:.3f}" for k, v in terms.items() if k in ("loss", "loss/inv", "loss/eq"))
        )
        if write:
            self._record_kernel_choices()
            row = {
                "step": step,
                "epoch": epoch,
                "lr": lr,
                **terms,
                "step_time_s": step_s,
                "data_time_s": data_s,
                "images_per_s": ips,
            }
            # reopened per row: readable live, nothing lost on a crash
            with writing(self.metrics, "the metrics log"), open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for name, value in row.items():
                    if name != "step":
                        self.tb.add_scalar(name, value, step)

    def _record_kernel_choices(self) -> None:
        """EQRECON_KERNELS=auto picks a kernel per shape on its first call: add what it kept to config.json."""
        from kernels import choices

        now = choices()
        if now != self.choices:
            self.choices = now
            self.meta["kernel_choices"] = now
            tmp = self.config_json.with_suffix(".json.tmp")
            with writing(self.config_json, "the run's config"):
                tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
                tmp.replace(self.config_json)

    def image(self, step: int, png: Path) -> None:
        """The recon grid just written, as a TensorBoard image."""
        if self.tb is not None and png.exists():
            from PIL import Image

            with Image.open(png) as image:
                self.tb.add_image("recon", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def kernel_path(device: torch.device) -> str:
    """Which kernels this run's decoder uses on `device`: "triton" or "ref" (kernels._backend decides)."""
    from kernels import _backend

    # A mistyped EQRECON_KERNELS raises ConfigError here, before the run starts.
    return "triton" if _backend.use_triton(torch.empty(0, device=device)) else "ref"
