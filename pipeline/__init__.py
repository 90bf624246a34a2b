"""Data: ImageNet-style folders -> webdataset shards -> `Batch` (views, path targets, θ, label).

`build_loader(cfg, rank, world_size)` is the one entry point; data.loader picks the backend (`auto`,
the default: DALI when it is installed, else the PyTorch reference loader with one warning); both
render data.multicrop (the DINO family's local crops and masks). It returns a `Loader`: iterating it
yields one epoch of `Batch`es on the rank's device; `len()` is the number of batches per epoch on
this rank (`pipeline.shards`' rule, the same for every backend); `set_epoch(e)` makes e the epoch
the next iteration reads (another epoch starts at its first batch, the current one keeps its position);
`state_dict()` (read-only) / `load_state_dict()` save and restore the position inside the epoch so a
resumed run neither replays nor skips data, also across backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.choice import DALI_INSTALL, LOADERS, choose_loader, dali_available

if TYPE_CHECKING:  # torch is imported lazily so `python -m pipeline.convert` starts fast
    import torch

    from pipeline.batch import Batch, DataConfig

__all__ = [
    "DALI_INSTALL",
    "LOADERS",
    "Batch",
    "DataConfig",
    "Loader",
    "PathConfig",
    "build_loader",
    "choose_loader",
    "dali_available",
    "resolve_data_dir",
]


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
        raise DataError(
            f"data folder {str(path)!r} does not exist; convert images first with "
            f"`python -m pipeline.convert --src IMAGENET --out {path}`"
        )
    if not (path / "dataset.json").is_file():
        raise DataError(f"{str(path)!r} has no dataset.json: is it a folder written by pipeline.convert?")
    return path


def build_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None
) -> Loader:
    """Build the configured loader for this rank (`choose_loader`). device: where batches land
    (default: cuda:<local rank> when CUDA is available, else cpu)."""
    import torch

    from pipeline.errors import ConfigError

    loader = choose_loader(cfg.loader, rank)
    if cfg.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by the {world_size} ranks")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    data_dir = resolve_data_dir(cfg)
    if loader == "dali":
        from pipeline.dali import build_dali_loader

        return build_dali_loader(cfg, data_dir, rank, world_size, device)
    from pipeline.reference import build_reference_loader

    return build_reference_loader(cfg, data_dir, rank, world_size, device)
