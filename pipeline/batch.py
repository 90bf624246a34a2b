"""The `Batch` every loader yields and the `DataConfig` every loader reads (docs/DESIGN.md, "Contracts")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from pipeline.path import PathConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where the shards are and how samples are built from them."""

    dir: str = ""  # shard folder made by pipeline.convert; "" = the embedded demo photos (converted once)
    split: str = "train"
    # auto (DALI when installed, else reference) | dali (GPU pipeline on CUDA, CPU pipeline otherwise) |
    # reference (PyTorch, the parity oracle)
    loader: str = "auto"
    img_size: int = 224  # view resolution
    target_size: int = 0  # resolution of the K intermediate targets; 0 = img_size
    batch_size: int = 256  # global batch, split evenly across ranks
    # CPU parallelism of whichever loader runs: the reference loader's DataLoader worker processes (0 =
    # in the training process; each worker reads its own part of the rank's samples) or DALI's CPU
    # threads (at least 1; the GPU pipeline decodes with nvJPEG whatever the value)
    workers: int = 4
    shuffle_buffer: int = 2048  # samples held for shuffling (shards are already shuffled when written)
    seed: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aug: PathConfig = field(default_factory=PathConfig)

    @property
    def out_target_size(self) -> int:
        return self.target_size or self.img_size


@dataclass
class Batch:
    """One batch on the training device.

    view1, view2: (B, 3, H, W) float32, normalised with DataConfig.mean/std.
    targets:      (B, K, 3, Ht, Wt) float32, the intermediate images u_k in the same normalisation
                  (K may be 0 for methods that reconstruct nothing along the path).
    theta:        (B, P) float32, layout pipeline.path.THETA_FIELDS.
    label:        (B,) int64, -1 where unknown.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    targets: torch.Tensor
    theta: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return self.view1.shape[0]
