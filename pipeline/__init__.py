"""Data: ImageNet-style folders -> webdataset shards -> `Batch` (views, path targets, θ, label).

`build_loader(cfg, rank, world_size)` is the one entry point. It returns a `Loader`: iterating it
yields one epoch of `Batch`es on the rank's device; `len()` is the number of batches per epoch on
this rank; `set_epoch(e)` reseeds shuffling and augmentation; `state_dict()` / `load_state_dict()`
save and restore the position inside the epoch so a resumed run neither replays nor skips data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch is imported lazily so `python -m pipeline.convert` starts fast
    import torch

    from pipeline.batch import Batch, DataConfig

__all__ = ["Batch", "DataConfig", "Loader", "PathConfig", "build_loader", "resolve_data_dir"]

LOADERS = ("dali", "reference")


def __getattr__(name: str):
    if name in ("Batch", "DataConfig"):
        from pipeline import batch

        return getattr(batch, name)
    if name == "PathConfig":
        from pipeline.path import PathConfig

        return PathConfig
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


class Loader(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The shard folder: cfg.dir, or the embedded demo photos converted into the cache."""
    if not cfg.dir:
        from pipeline.demo import ensure_demo_shards

        return ensure_demo_shards()
    from pipeline.errors import DataError

    path = Path(cfg.dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist; convert images first with "
                        f"`python -m pipeline.convert --src IMAGENET --out {path}`")
    if not (path / "dataset.json").is_file():
        raise DataError(f"{str(path)!r} has no dataset.json: is it a folder written by pipeline.convert?")
    return path


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None) -> Loader:
    """Build the configured loader for this rank. device: where batches land (default: cuda:<local rank>
    when CUDA is available, else cpu)."""
    import torch

    if cfg.loader not in LOADERS:
        raise ValueError(f"unknown data.loader {cfg.loader!r}; choose from {', '.join(LOADERS)}")
    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {world_size} ranks")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    data_dir = resolve_data_dir(cfg)
    if cfg.loader == "dali":
        from pipeline.dali import build_dali_loader

        return build_dali_loader(cfg, data_dir, rank, world_size, device)
    from pipeline.reference import build_reference_loader

    return build_reference_loader(cfg, data_dir, rank, world_size, device)
