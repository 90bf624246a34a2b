"""Training checkpoints: the one place that writes, finds, reads and validates them.

A checkpoint is a dict that `torch.load(path, weights_only=True)` reads (tensors and plain Python
types only):

    format      "eqrecon-train-checkpoint"; version: FORMAT_VERSION
    model, optimizer, scheduler    their state_dicts
    step, epoch, world_size        where the run stands and how many ranks wrote it
    rng         one dict per rank: python (random.getstate()), numpy (MT19937 key as an int64 tensor),
                torch, cuda
    loader      one loader.state_dict() per rank
    config      the resolved config (train.config.to_dict); run_dir: the absolute run folder
    git_sha

Checkpoints written before the format key existed hold numpy's RNG tuple (an ndarray): they still
resume, read with numpy's array types allowed in the unpickler (nothing else is).

`save` writes `ckpt/step-NNNNNN.pt` through a temporary file, fsyncs and renames it, then points
`ckpt/last.pt` at it: a crash or a full disk at any moment leaves the previous checkpoint loadable.
`read` and `check_architecture` raise CheckpointError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import CheckpointError

FORMAT = "eqrecon-train-checkpoint"
FORMAT_VERSION = 1
# What a checkpoint from before the format key holds; enough to tell it from someone else's file.
LEGACY_KEYS = {"model", "optimizer", "scheduler", "step", "epoch", "rng", "loader", "world_size", "config"}


# --- RNG states as tensors and plain types ---------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states in a form weights_only loading accepts."""
    numpy = np.random.get_state(
        legacy=False
    )  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss or None)
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s output, or the legacy form (numpy's get_state() tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (
            "MT19937",
            numpy["key"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- writing --------------------------------------------------------------------------------------


def save(ckpt_dir: Path, state: dict, step: int, keep: int) -> Path:
    """Write ckpt_dir/step-NNNNNN.pt atomically, point last.pt at it, keep the newest `keep` step files.

    An OSError (full disk, read-only folder, quota) becomes a CheckpointError naming the path; the
    temporary file is removed and last.pt still points at the previous, complete checkpoint.
    """
    state = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    path = ckpt_dir / f"step-{step:06d}.pt"
    tmp = None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{path.name}.", suffix=".tmp")
        # Through a Python file object: torch.save on a path reports a full disk as an opaque
        # "enforce fail" RuntimeError, on a file object as the OSError it is.
        with os.fdopen(fd, "wb") as f:
            _save_reporting_os_errors(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        link = ckpt_dir / "last.pt.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, ckpt_dir / "last.pt")
        for old in sorted(ckpt_dir.glob("step-*.pt"))[: -max(1, keep)]:
            old.unlink()
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {err.strerror or err}; "
            "free space or make the run folder writable, then resume from "
            f"{ckpt_dir / 'last.pt'}"
        ) from None
    return path


def _save_reporting_os_errors(state: dict, f) -> None:
    """torch.save, with a failed write reported as the OSError it is: when a write fails mid-file,
    torch's zip writer raises an "enforce fail" RuntimeError on closing, which hides the OSError."""
    try:
        torch.save(state, f)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


# --- reading --------------------------------------------------------------------------------------


def _numpy_globals() -> list:
    """The numpy types a legacy checkpoint's pickled RNG tuple needs, and nothing more."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    types = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    types += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]  # numpy.dtypes.UInt32DType ...
    return types


def read(path: str | Path, flag: str = "--resume") -> dict:
    """Load and check a training checkpoint (on the CPU, memory-mapped); CheckpointError when it is
    missing, empty, truncated, not a torch file, or not eqrecon's. `flag` names the option the path came
    from in the messages ("" for none)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{where}: the file is empty (a checkpoint interrupted while written?)")
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            # weights_only rejects the numpy RNG tuple of pre-format checkpoints: allow numpy's array
            # types only, so a foreign pickle still cannot run code.
            with torch.serialization.safe_globals(_numpy_globals()):
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        # torch reports a truncated zip as RuntimeError ("failed finding central directory") and a
        # foreign pickle as UnpicklingError; either way the file is not a checkpoint we can resume.
        why = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{where}: not a readable training checkpoint, truncated or not written by eqrecon ({why})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: not an eqrecon training checkpoint (holds a {type(state).__name__})")
    if state.get("format") != FORMAT and not LEGACY_KEYS <= state.keys():
        what = f"format {state['format']!r}" if "format" in state else f"keys {', '.join(sorted(state)[:6])}"
        raise CheckpointError(
            f"{where}: not an eqrecon training checkpoint ({what}); an exported backbone cannot be resumed"
        )
    if state.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {state['version']} is newer than "
            f"this eqrecon reads ({FORMAT_VERSION}); update eqrecon"
        )
    return state


def newest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable ckpt/step-*.pt of a run folder with its contents, for `--resume auto`;
    unreadable ones are skipped with a warning. None when the folder holds none."""
    for path in sorted((run_dir / "ckpt").glob("step-*.pt"), reverse=True):
        try:
            return path, read(path)
        except CheckpointError as err:
            warnings.warn(f"--resume auto: skipping {path}: {err}", RuntimeWarning, stacklevel=2)
    return None


def check_architecture(state: dict, model: nn.Module, path: str | Path) -> None:
    """CheckpointError naming the first parameter or buffer whose name or shape differs between the
    checkpoint and the model built from the config."""
    saved, built = state["model"], model.state_dict()
    hint = (
        "; resume with the checkpoint's own model settings (drop the --model.* / --data.img_size overrides)"
    )
    for name, value in built.items():
        if name not in saved:
            raise CheckpointError(
                f"--resume {path}: the checkpoint has no {name}, which this config's model has "
                f"(a different architecture){hint}"
            )
        if tuple(saved[name].shape) != tuple(value.shape):
            raise CheckpointError(
                f"--resume {path}: {name} has shape {tuple(saved[name].shape)} in the checkpoint "
                f"but {tuple(value.shape)} in this config's model{hint}"
            )
    extra = next((name for name in saved if name not in built), None)
    if extra is not None:
        raise CheckpointError(
            f"--resume {path}: the checkpoint has {extra}, which this config's model lacks "
            f"(a different architecture){hint}"
        )
