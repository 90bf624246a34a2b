"""What differs between the GPU science run and its CPU-sized stand-in, and the methods it trains."""

from __future__ import annotations

from dataclasses import dataclass, field

# Method name in the report -> (train/main.py preset, extra overrides). `path` uses the path paper's
# conv decoder; the `path@...` rows are the λ / reduction sweep (the gradient ratio ~0.01 -> ~1).
CPU_METHODS = {
    "vicreg": ("demo-vicreg", ()),
    "sie": ("demo-sie", ()),
    "xattn": ("demo-xattn", ()),
    "path": ("demo", ("--model.decoder=conv",)),
    "path@lam30": ("demo", ("--model.decoder=conv", "--model.lam=30")),
    "path@sum": ("demo", ("--model.decoder=conv", "--model.recon_reduction=sum", "--model.lam=0.1")),
}
GPU_METHODS = {
    "vicreg": ("vits16-vicreg", ()),
    "sie": ("vits16-sie", ()),
    "xattn": ("vits16-xattn", ()),
    "path": ("vits16-path", ("--model.decoder=conv",)),
}
METHODS = tuple(CPU_METHODS)
FAMILIES = ("rotation", "translation", "color", "blur", "crop", "flip")


@dataclass
class Size:
    """One science-run size: training budget, data and probe settings."""

    methods: dict  # name -> (preset, overrides)
    img_size: int
    batch_size: int
    steps: int
    overrides: list = field(default_factory=list)  # extra --section.field=value for every run
    crops_train: int = 40_000
    crops_val: int = 1_000
    crop_px: int = 160  # short side of the stored crops
    fmnist_train: int = 20_000
    fmnist_val: int = 5_000
    probe_images: int = 1_000
    probe_families: tuple = FAMILIES
    probe_pools: tuple = ("mean", "grid2", "tokens")
    probe_targets: tuple = ("signed", "abs")
    probe_seeds: tuple = (0, 1, 2)
    probe_pairs: int = 5_000  # train pairs per family
    probe_hidden: int = 0  # probe MLP width; 0 = the fast protocol's (256)
    linear: bool = True  # also the Fashion-MNIST linear / k-NN probe
    seeds: tuple = (0, 1)
    device: str = "cuda"
    threads: int = 0  # torch threads of the probes (training: --run.threads); 0 = the default


SIZES = {
    # ViT-S/16 at 112 px (7x7 tokens: grid2 needs an even grid, so mean and tokens), batch 256, 1500 steps.
    "gpu": Size(
        methods=GPU_METHODS,
        img_size=112,
        batch_size=256,
        steps=1500,
        probe_pools=("mean", "tokens"),
        overrides=[
            "--optim.base_lr=5e-4",
            "--data.workers=8",
            "--run.ckpt_every=250",
            "--run.recon_every=500",
            "--run.log_every=25",
        ],
    ),
    # The demo presets' tiny ViT (4 blocks, patch 8) at 32 px (4x4 tokens), rotation only (the family
    # where the papers differ most), batch 32, lr 1e-3; one thread per process: on 2 shared cores two
    # threads run several times slower. ~3 min per run there (1.5 steps/s); the probe (5,000 train
    # pairs, 3 probe seeds, parts all and eq, one setting: grid2 pooling, signed φ, MLP width 128)
    # ~3 min per run; the other pools and |φ| are left to the GPU size.
    "cpu": Size(
        methods=CPU_METHODS,
        img_size=32,
        batch_size=32,
        steps=300,
        crops_train=3_000,
        crops_val=600,
        crop_px=48,
        fmnist_train=2_000,
        fmnist_val=500,
        probe_images=600,
        probe_families=("rotation",),
        probe_pools=("grid2",),
        probe_targets=("signed",),
        probe_hidden=128,
        linear=False,
        device="cpu",
        threads=1,
        overrides=[
            "--optim.base_lr=1e-3",
            "--data.workers=1",
            "--run.ckpt_every=100",
            "--run.recon_every=150",
            "--run.log_every=20",
            "--run.device=cpu",
            "--run.threads=1",
            "--data.aug.transforms=rotation",
        ],
    ),
}
