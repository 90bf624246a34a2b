"""The `Batch` every loader yields and the `DataConfig` every loader reads (docs/DESIGN.md, "Contracts")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pipeline.path import PathConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MultiCropConfig:
    """Multi-crop for the DINO family (pipeline/multicrop.py renders it): sizes, scales and the local
    crops' photometric augmentation (DINO's values). Off by default: the views alone (VICReg presets)."""

    enabled: bool = False  # two global crops (the views) + n_local local crops + iBOT masks
    n_local: int = 10  # L local crops per sample: iBOT 10, DINOv2 and DINO 8
    global_size: int = 224  # both global crops (view1, view2): must equal data.img_size (config check)
    local_size: int = 96  # the local crops' side in pixels (DINO family: 96)
    global_scale: tuple[float, float] = (
        0.25,
        1.0,
    )  # area fraction: iBOT 0.25-1, DINOv2 0.32-1 (= data.aug.crop_scale)
    local_scale: tuple[float, float] = (0.05, 0.25)  # iBOT 0.05-0.25, DINOv2 0.05-0.32
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (w/h) of the local crops
    flip_p: float = 0.5  # horizontal flip probability of each local crop
    jitter_p: float = 0.8  # probability that the colour jitter is applied at all
    brightness: float = 0.4  # jitter factors 1 + δ, δ ~ U(±brightness) (torchvision ColorJitter)
    contrast: float = 0.4  # contrast factor 1 + δ, δ ~ U(±contrast)
    saturation: float = 0.2  # saturation factor 1 + δ, δ ~ U(±saturation)
    hue: float = 0.1  # hue shift ~ U(±hue)
    grey_p: float = 0.2  # probability of greyscale
    blur_p: float = 0.5  # probability of a Gaussian blur with σ ~ U(blur_sigma)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # σ in local-crop pixels
    masks: bool = True  # draw iBOT's masks (ibot, dinov2); dino does without
    patch_size: int = 16  # the encoder's patch (model.patch_size): the mask grid is global_size / patch_size


@dataclass
class DataConfig:
    """Where the shards are and how samples are built from them."""

    dir: str = ""  # shard folder made by pipeline.convert; "" = the embedded demo photos (converted once)
    split: str = "train"  # which split of the shards to train on (a name in dataset.json's splits)
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
    seed: int = 0  # the augmentation and sample-order seed (run.seed seeds the model)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation mean (RGB, 0-1)
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel normalisation std (RGB, 0-1)
    aug: PathConfig = field(default_factory=PathConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)  # the DINO family's crops

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
    local:        (B, L, 3, h, w) float32 local crops, normalised like the views; None without multi-crop.
    masks:        (B, 2, N) bool, iBOT's masks of the two global crops' N patch tokens; None without.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    targets: torch.Tensor
    theta: torch.Tensor
    label: torch.Tensor
    local: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def _map(self, fn) -> Batch:
        """The same batch type with fn applied to every tensor field (None fields stay None)."""
        return dataclasses.replace(
            self,
            **{f.name: fn(v) for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None},
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.view1.shape[0]
