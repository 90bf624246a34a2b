"""Training checkpoints: the one place that writes, finds, reads and validates them.

A checkpoint is a dict that `torch.load(path, weights_only=True)` reads (tensors and plain Python
types only):

    format      "eqrecon-train-checkpoint"; version: FORMAT_VERSION
    model, optimizer, scheduler    their state_dicts
    step, epoch, world_size        where the run stands and how many ranks wrote it
    rng         one dict per rank: python (random.getstate()), numpy (MT19937 key as an int64 tensor),
                torch, cuda
    loader      one loader.state_dict() per rank
    config      the resolved config (train.config.to_dict); run_dir: the absolute run folder it was
                written in (a record only: a resume continues in the folder that now holds the file)
    git_sha
    checksum    "sha256:<hex>" of everything above (`digest`), added last by `save`, checked by `read`

A file without the format key or without a checksum (written by an eqrecon before 0.1.0's
checkpoint format) is refused with one line: start a new run. So is a pickled numpy array (the RNG
state of pre-format files) and an optimizer state that numbers its parameters instead of naming them.

`save` writes `ckpt/step-NNNNNN.pt` through a temporary file, fsyncs and renames it, then points
`ckpt/last.pt` at it: a crash or a full disk at any moment leaves the previous checkpoint loadable.
Step files are ordered by the step their name holds, never by the name (from step 1,000,000 the name
has seven digits and sorts before `step-999000.pt` as text). `read` verifies the checksum, so a file
whose bytes changed after the write (a bad disk, a partial copy) is refused as damaged even when its
zip structure is intact. `read`, `check_architecture` and `check_param_groups` raise CheckpointError
with one line naming the file and what is wrong. On resume the checkpoint gives the optimizer its
moments and step, the command's config its settings (`optimizer_settings`, `apply_settings`,
`optimizer_overrides`: train/loop.restore applies them and says which overrides changed).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import CheckpointError

FORMAT = "eqrecon-train-checkpoint"
FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step-(\d+)\.pt")  # ckpt/step-NNNNNN.pt: at least six digits, more past 999,999


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
    """Restore rng_state()'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- the checksum ---------------------------------------------------------------------------------


def digest(state: dict) -> str:
    """ "sha256:<hex>" of a checkpoint's contents: every tensor's dtype, shape and bytes and every other
    value's type and repr, in the (pickle-preserved) order of the dicts and lists that hold them."""
    h = hashlib.sha256()
    _feed(h, state)
    return f"sha256:{h.hexdigest()}"


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype (bf16 too)
    elif isinstance(value, dict):
        h.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(h, item)
    else:  # str, int, float (repr round-trips exactly), bool, None
        h.update(f"{type(value).__name__} {value!r};".encode())


# --- writing --------------------------------------------------------------------------------------


def step_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """ckpt_dir's step files as (step, path), oldest first, ordered by the step their name holds."""
    found = ((STEP_FILE.fullmatch(p.name), p) for p in ckpt_dir.glob("step-*.pt"))
    return sorted((int(m.group(1)), p) for m, p in found if m)


def save(ckpt_dir: Path, state: dict, step: int, keep: int) -> Path:
    """Write ckpt_dir/step-NNNNNN.pt atomically, point last.pt at it, keep `keep` step files: this
    one and the newest older ones. Step files past `step` are removed: they belong to the schedule a
    resume from an older checkpoint abandoned, and `--resume auto` must not return to them. Temporary
    files that a killed write left behind are removed before writing.

    An OSError (full disk, read-only folder, quota) becomes a CheckpointError naming the path; the
    temporary file is removed and last.pt still points at the previous, complete checkpoint.
    """
    state = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    state["checksum"] = digest(state)  # last: `read` hashes everything before it
    path = ckpt_dir / f"step-{step:06d}.pt"
    tmp = None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # Only rank 0 of the run that holds the folder writes here, and a failed write removes its
        # own: any such file is a killed write's (kill -9 mid-save), checkpoint-sized, never reused.
        for stale in ckpt_dir.glob(".step-*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
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
        older = [p for s, p in step_files(ckpt_dir) if s < step]
        later = [p for s, p in step_files(ckpt_dir) if s > step]
        for old in later + older[: max(0, len(older) - (max(1, keep) - 1))]:
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


def read(path: str | Path, flag: str = "--resume") -> dict:
    """Load and check a training checkpoint (on the CPU, memory-mapped); CheckpointError when it is
    missing, empty, truncated, unreadable, not a torch file, not eqrecon's, without a checksum (from
    before 0.1.0's format), or damaged (its contents differ from the checksum recorded at the write). `flag` names the option the path came from in the
    messages ("" for none)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{where}: the file is empty (a checkpoint interrupted while written?)")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        # torch reports a truncated zip as RuntimeError ("failed finding central directory"), or, cut
        # inside its first records, as OSError (EINVAL), and a foreign pickle (numpy arrays included,
        # as in pre-format checkpoints' RNG states) as UnpicklingError; either way the file is not a
        # checkpoint we can resume.
        why = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{where}: not a readable training checkpoint, truncated or not written by eqrecon ({why})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: not an eqrecon training checkpoint (holds a {type(state).__name__})")
    if state.get("format") != FORMAT:
        what = f"format {state['format']!r}" if "format" in state else f"keys {', '.join(sorted(state)[:6])}"
        raise CheckpointError(
            f"{where}: not an eqrecon training checkpoint ({what}); an exported backbone cannot be resumed"
        )
    if state.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {state['version']} is newer than "
            f"this eqrecon reads ({FORMAT_VERSION}); update eqrecon"
        )
    if "checksum" not in state:
        raise CheckpointError(
            f"{where}: no checksum: written by an eqrecon before 0.1.0's checkpoint format; start a new run"
        )
    if digest({k: v for k, v in state.items() if k != "checksum"}) != state["checksum"]:
        raise CheckpointError(
            f"{where}: damaged: its contents differ from the checksum recorded when it was written "
            "(bytes changed on disk or in a copy); resume from an older checkpoint of the run "
            "(--resume auto skips damaged ones)"
        )
    return state


def newest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable ckpt/step-*.pt of a run folder with its contents, for `--resume auto`;
    unreadable ones are skipped with a warning. None when the folder holds none."""
    for _, path in reversed(step_files(run_dir / "ckpt")):
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


# --- optimizer settings: the command's config, applied after the checkpoint's state ---------------


def check_param_groups(state: dict, method: nn.Module, optimizer, path: str | Path) -> None:
    """CheckpointError when this config groups the parameters into optimizer groups other than the
    checkpoint's (--optim.layer_decay / --optim.patch_embed_lr decide the grouping): the saved
    per-group state cannot be put back then; also when the saved groups number their parameters
    (`optimizer.state_dict()`, as eqrecon wrote before 0.1.0's checkpoint format) instead of naming them."""
    saved = state["optimizer"].get("param_groups", [])
    if any(not isinstance(p, str) for g in saved for p in g["params"]):
        raise CheckpointError(
            f"--resume {path}: its optimizer state numbers the parameters instead of naming them "
            "(written by an eqrecon before 0.1.0's checkpoint format); start a new run"
        )
    name_of = {id(p): n for n, p in method.named_parameters()}
    built = [sorted(name_of[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    if built != [sorted(g["params"]) for g in saved]:
        raise CheckpointError(
            f"--resume {path}: this config puts the parameters into {len(built)} optimizer groups other "
            f"than the checkpoint's {len(saved)} (--optim.layer_decay and --optim.patch_embed_lr decide "
            "the grouping); resume with the checkpoint's values of those two"
        )


def optimizer_settings(optimizer, scheduler) -> tuple[list[dict], list[float]]:
    """What the command's config built, before a checkpoint replaces it: each param group's settings
    (betas, weight decay, ...; not its parameters) and the scheduler's peak lrs."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def apply_settings(optimizer, scheduler, settings: tuple[list[dict], list[float]]) -> None:
    """Put optimizer_settings' values back after loading a checkpoint, keeping its moments and step,
    and set each group's lr to the config's schedule at the restored step (what a run started with
    this config has there). With the checkpoint's own config every value is the one it restored."""
    groups, base_lrs = settings
    scheduler.base_lrs = list(base_lrs)
    # LambdaLR's rule: lr = base_lr * factor(last_epoch), with the config's factor (lr_lambdas are
    # never saved, so they are already this config's: epochs, warm-up, min_lr).
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, built, base, lr in zip(optimizer.param_groups, groups, base_lrs, lrs):
        group.update({k: v for k, v in built.items() if k not in ("lr", "initial_lr")})
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


def optimizer_overrides(saved: dict, current: dict) -> list[str]:
    """The optim.* settings in which this command differs from the run that wrote the checkpoint, as
    "--optim.base_lr=0.003 (was 0.005)"; ConfigError for optim.name, whose state cannot carry over."""

    def shown(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    def plain(value):  # a saved tuple may come back as a list, an integral float as an int
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    changed = [
        (key, saved[key], value)
        for key, value in current.items()
        if key in saved and plain(saved[key]) != plain(value)
    ]
    for key, old, new in changed:
        if key == "name":
            raise CheckpointError(
                f"--optim.name={new}: the checkpoint's optimizer state is {old}'s; a resumed run keeps "
                f"its optimizer (drop --optim.name or start a new run)"
            )
    return [f"--optim.{key}={shown(new)} (was {shown(old)})" for key, old, new in changed]
