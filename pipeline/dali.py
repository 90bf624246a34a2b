"""The DALI pipeline: webdataset shards -> `Batch` (view 1, view 2, K path targets, θ, label; with
data.multicrop.enabled also the DINO family's local crops, drawn and rendered in the graph by
pipeline/dali_multicrop.py, and iBOT's masks, drawn per (seed, epoch, rank, batch) outside it).

One graph, two placements: `device="gpu"` decodes with nvJPEG (`mixed`) and runs every image operator
on the GPU; `device="cpu"` is the same graph with CPU operators and `device_id=None` (what CI runs).
The semantics are those of `pipeline.path` and the PyTorch reference (`pipeline.reference`), which is
the oracle the parity tests compare against:

    θ          sampled per sample inside the graph (fn.random.*): the g part uniform in the configured
               ranges, crop boxes by torchvision's RandomResizedCrop rule (10 tries, then a centre crop)
    view1      = normalise(crop_resize(I, crop1, flip1, img_size))
    u          = crop_resize(I, crop2, flip2, size)     (bilinear, antialiased; the flip folded into the ROI)
    view2, u_k = normalise(g_{t·θ}(u)),  t = 1 and k/(K+1)
    g          = colour (brightness, contrast, saturation, hue; torchvision.transforms.v2 semantics,
               clamped to [0, 1] after each) -> Gaussian blur (kernel 2·ceil(3σ)+1, reflect-101 border)
               -> affine warp with `path.affine_matrix` (bilinear, `fill` outside the image)

The operators (and why colour is written with arithmetic operators) are in pipeline/dali_ops.py.

Epochs: every epoch builds a fresh pipeline seeded by (seed, epoch, rank), whose reader reads the
rank's contiguous sample range of `pipeline.shards` (its part `rank_part` as the reader's shard_id) and
shuffles within `shuffle_buffer`; every rank yields `shards.epoch_length` full batches, as the
reference loader does. The position inside an epoch is kept with DALI's pipeline checkpointing
(base64 text in `state_dict`), so a resumed run continues with the next batch, neither replaying nor
skipping one; a state from another loader (no DALI checkpoint) replays the epoch up to its position.

Bad data is reported before it is read where possible: every shard and index listed in dataset.json
must exist and agree, each tar's size is checked again before every epoch, and a sample that lacks its
.jpg or .cls (which the reader skips) is an error, not a silent loss; an unlabeled dataset (dataset.json
"labeled": false) is read as .jpg alone, with label -1. Shards are read, not memory-mapped,
so a shard damaged under a running reader is an error too, never SIGBUS. A decoding failure is traced to the damaged shard by checking this rank's shards against
dataset.json.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from pipeline.batch import Batch, DataConfig
from pipeline.choice import choose_loader
from pipeline.dali_ops import _on, render, sample_theta
from pipeline.errors import ConfigError, ShardError
from pipeline.path import (
    THETA_DIM,
    validate,
)
from pipeline.shards import (
    CLS_BYTES,
    Shard,
    check_index,
    check_sizes,
    dataset_is_labeled,
    epoch_length,
    load_meta,
    parse_labels,
    pieces,
    rank_part,
    rank_range,
    split_shards,
    verify_shard,
)

READER = "shards"  # the reader's name, which lets the iterator know where an epoch ends
OUTPUTS = ("view1", "view2", "targets", "theta", "label", "local")  # local: data.multicrop.enabled only


# ----------------------------------------------------------------------------------------- pipeline


def build_pipeline(
    cfg: DataConfig,
    batch_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    seed: int = 0,
    files: list[Path] | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    external: tuple | None = None,
    checkpoint: str | None = None,
    labeled: bool = True,
):
    """The DALI pipeline -> (pipeline, output names).

    Reads `files` (tar shards, .idx beside each; `.jpg` + `.cls` per sample, or `.jpg` alone when not
    `labeled`, whose label is then -1) with θ sampled in the graph, or, for parity tests,
    `external` = (images, theta): callables returning a batch of decoded HWC uint8 images and a
    (B, THETA_DIM) float32 array, so DALI renders exactly the θ (and pixels) it is given.
    """
    from nvidia.dali import Pipeline, fn, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    validate(cfg.aug)
    gpu = device == "gpu"
    threads = max(1, cfg.workers)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id if gpu else None,
        seed=seed,
        enable_checkpointing=external is None,
        checkpoint=checkpoint,
        prefetch_queue_depth=2,
    )
    with pipe:
        if external is None:
            shuffle = cfg.shuffle_buffer > 0
            members = fn.readers.webdataset(
                paths=[str(f) for f in files],
                index_paths=[str(f.with_suffix(".idx")) for f in files],
                ext=["jpg", "cls"] if labeled else ["jpg"],
                missing_component_behavior="skip",
                random_shuffle=shuffle,
                initial_fill=max(1, cfg.shuffle_buffer),
                shard_id=shard_id,
                num_shards=num_shards,
                # read(), not mmap: a shard truncated under a running reader is then a read error DALI
                # reports, where a mapped page past the new end would kill the process with SIGBUS
                dont_use_mmap=True,
                name=READER,
            )
            jpg, cls = members if labeled else (members, None)
            # EXIF orientation is ignored, as PIL and torchvision.io do by default
            shape = fn.cast(fn.peek_image_shape(jpg, adjust_orientation=False), dtype=types.FLOAT)
            img = fn.decoders.image(
                jpg, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )
            H, W = shape[0], shape[1]
            theta = sample_theta(H, W, cfg.aug)
            # zero bytes parse as -1 (`parse_labels`): the label of every sample of an unlabeled set
            no_cls = fn.cast(shape[0:1] * 0.0, dtype=types.UINT8)
            label = fn.pad(cls if labeled else no_cls, fill_value=0, shape=[CLS_BYTES])
        else:
            images, thetas = external
            img = fn.external_source(source=images, batch=True, layout="HWC", dtype=types.UINT8)
            theta = fn.external_source(source=thetas, batch=True, dtype=types.FLOAT)
            shape = fn.cast(img.shape(), dtype=types.FLOAT)
            H, W = shape[0], shape[1]
            img = _on(img, device)
            label = fn.pad(fn.cast(shape[0:1] * 0.0, dtype=types.UINT8), fill_value=0, shape=[CLS_BYTES])
        view1, view2, targets = render(img, theta, H, W, cfg, device)
        outs = {
            "view1": view1,
            "view2": view2,
            "targets": targets,
            "theta": theta,
            "label": label,
            "local": None,
        }
        if cfg.multicrop.enabled:  # the DINO family's local crops, drawn in the graph like θ
            from pipeline import dali_multicrop  # it builds on this module's operators

            params = dali_multicrop.sample_local_params(H, W, cfg.multicrop)
            outs["local"] = dali_multicrop.local_crops(img, params, H, W, cfg.multicrop, cfg, device)
        names = [k for k in OUTPUTS if outs[k] is not None]
        pipe.set_outputs(*[_on(outs[k], device) if k in ("theta", "label") else outs[k] for k in names])
    return pipe, names


def _to_batch(out: dict, target_size: int, device: torch.device, masks: torch.Tensor | None = None) -> Batch:
    """The pipeline's outputs (+ iBOT's masks, drawn outside the graph) -> a Batch on `device`."""
    view1 = out["view1"]
    targets = out.get("targets")
    if targets is None:  # K = 0: an empty target tensor keeps the Batch contract
        targets = view1.new_zeros(view1.shape[0], 0, 3, target_size, target_size)
    batch = Batch(
        view1=view1,
        view2=out["view2"],
        targets=targets,
        theta=out["theta"],
        label=parse_labels(out["label"]),
        local=out.get("local"),
        masks=masks,
    )
    return batch.to(device)


def _dali_reason(err: Exception) -> str:
    """The operator's own complaint from a DALI error (the line after 'encountered:')."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else lines
    return next((ln for ln in after if ln), "unknown error")[:300]


def _shard_error(err: Exception, shards: list[Shard], labeled: bool = True) -> ShardError:
    """A DALI failure while reading -> one line naming the shard.

    DALI's decode errors do not say which sample failed, so the shards this rank reads are checked
    against dataset.json (sha256, tar/index agreement) to find the damaged one; this runs only on failure.
    """
    reason = _dali_reason(err)
    for shard in shards:
        try:
            verify_shard(shard.path, sha256=shard.sha256, labeled=labeled)
        except ShardError as bad:
            return ShardError(
                f"shard {shard.path} is corrupt ({bad}; DALI: {reason}); re-run pipeline.convert "
                "to rewrite it"
            )
    files = [s.path for s in shards]
    where = f"{files[0].parent}/{{{files[0].name} .. {files[-1].name}}}"
    return ShardError(f"DALI failed while reading {where}, which all match dataset.json: {reason}")


class DaliLoader:
    """Epochs of `Batch` from the DALI pipeline for one rank (see the module docstring for the policy)."""

    def __init__(
        self,
        cfg: DataConfig,
        data_dir: str | Path,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        dali_device: str | None = None,
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.dali_device = dali_device or ("gpu" if self.device.type == "cuda" else "cpu")
        if self.dali_device == "gpu" and self.device.type != "cuda":
            raise ValueError(f"the GPU DALI pipeline needs a CUDA device, got {self.device}")
        self.device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self.dali_device == "gpu"
            else None
        )
        self.local_batch = cfg.batch_size // world_size
        self.shards = split_shards(data_dir, cfg.split)
        self.labeled = dataset_is_labeled(load_meta(data_dir))  # unlabeled shards hold no .cls
        self.needed = [check_index(s) for s in self.shards]  # tar sizes, re-checked before every epoch
        self.files = [s.path for s in self.shards]
        self.samples = sum(s.count for s in self.shards)
        self.batches = epoch_length(self.samples, world_size, self.local_batch)
        if self.batches == 0:
            raise ConfigError(
                f"split {cfg.split!r} of {data_dir} has {self.samples} samples: fewer than one batch "
                f"of {self.local_batch} per rank on {world_size} rank(s); lower data.batch_size"
            )
        self.epoch = 0
        self._position = 0  # batches of self.epoch already handed out
        self._checkpoint: tuple[int, str] | None = None  # (position, DALI's state after that many batches)
        self._iterator = None
        self._positioned = False  # set_epoch / load_state_dict chose where the next iteration starts

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        """Make `epoch` the one the next iteration reads: another epoch starts at its first batch, the
        current one keeps its position (a running, resumed or finished epoch is never rewound)."""
        if epoch != self.epoch:
            self.epoch, self._position, self._checkpoint = epoch, 0, None
        self._positioned = True

    def _settings(self) -> dict:
        return {
            "loader": "dali",
            "seed": self.cfg.seed,
            "split": self.cfg.split,
            "batch_size": self.cfg.batch_size,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """{epoch, batch (handed out in that epoch), DALI's checkpoint of the pipeline state after them};
        read-only apart from caching that checkpoint."""
        if self._iterator is not None and 0 < self._position < self.batches:
            cpt = self._iterator.checkpoints()[0]
            # DALI serialises to bytes; base64 text keeps the state JSON- and torch.save-friendly
            text = base64.b64encode(cpt if isinstance(cpt, bytes) else cpt.encode()).decode("ascii")
            self._checkpoint = (self._position, text)
        # a checkpoint cached at another position (the iteration has moved on or was closed) is dropped:
        # the resumed epoch is then replayed up to the position instead
        cpt = self._checkpoint[1] if self._checkpoint and self._checkpoint[0] == self._position else None
        return {"epoch": self.epoch, "batch": self._position, "dali_checkpoint": cpt, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self._settings().items():
            if name != "loader" and state.get(name) != value:
                raise ConfigError(
                    f"cannot resume the DALI loader: saved {name}={state.get(name)!r}, now {value!r}; "
                    "the position is only meaningful with the same data settings"
                )
        if not 0 <= int(state["batch"]) <= self.batches:
            raise ConfigError(
                f"cannot resume at batch {state['batch']}: the epoch has {self.batches} batches"
            )
        self.epoch, self._position = int(state["epoch"]), int(state["batch"])
        # a state saved by another loader has no DALI checkpoint: the epoch is then replayed up to the position
        cpt = state.get("dali_checkpoint") if state.get("loader") == "dali" else None
        self._checkpoint = (self._position, cpt) if cpt else None
        self._positioned = True  # a state saved after an epoch's last batch resumes into its empty remainder

    def _masks(self, i: int) -> torch.Tensor | None:
        """iBOT's masks of batch i of this rank's epoch: a function of (seed, epoch, rank, i), so a
        resumed epoch gets the same ones; None without multi-crop masks."""
        mc = self.cfg.multicrop
        if not (mc.enabled and mc.masks):
            return None
        from pipeline.dali_multicrop import batch_masks

        return batch_masks(mc, self.cfg.seed, self.epoch, self.rank, i, self.local_batch)

    def _seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self.epoch * 7_919 + self.rank * 104_729) % (2**31 - 1)

    def _failure(self, err: Exception) -> ShardError:
        try:  # a shard cut short while the reader ran: say so rather than "corrupt"
            check_sizes(self.shards, self.needed)
        except ShardError as e:
            return e
        lo, hi = rank_range(self.samples, self.rank, self.world_size, self.epoch)
        return _shard_error(err, [shard for shard, _, _ in pieces(self.shards, lo, hi)], self.labeled)

    def _build(self, checkpoint: str | None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe, names = build_pipeline(
            self.cfg,
            self.local_batch,
            self.dali_device,
            self.device_id,
            seed=self._seed(),
            files=self.files,
            shard_id=rank_part(self.rank, self.world_size, self.epoch),
            num_shards=self.world_size,
            checkpoint=checkpoint,
            labeled=self.labeled,
        )
        try:
            pipe.build()
        except RuntimeError as e:
            raise self._failure(e) from None
        read = pipe.epoch_size(READER)
        if read != self.samples:
            raise ShardError(
                f"the indexes of {self.files[0].parent} list {self.samples} samples but DALI reads "
                f"{read}: some samples lack a {'.jpg or .cls' if self.labeled else '.jpg'} member; "
                "re-run pipeline.convert"
            )
        try:  # the iterator runs the pipeline ahead right away, so decoding errors can surface here
            return DALIGenericIterator(
                [pipe], names, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False
            )
        except RuntimeError as e:
            raise self._failure(e) from None

    def __iter__(self):
        """The rest of the current epoch. An epoch that an earlier iteration finished is followed by the
        next one (a plain loop over epochs); one restored as finished yields nothing (its empty rest)."""
        if self._position >= self.batches and not self._positioned:
            self.epoch, self._position, self._checkpoint = self.epoch + 1, 0, None
        self._positioned = False
        if self._position >= self.batches:
            return
        check_sizes(self.shards, self.needed)
        saved = self._checkpoint[1] if self._checkpoint and self._checkpoint[0] == self._position else None
        resume = base64.b64decode(saved) if self._position > 0 and saved else None
        skip = self._position if self._position > 0 and resume is None else 0
        start = self._position - skip  # without a DALI checkpoint, replay the epoch up to the position
        self._iterator = self._build(resume)
        try:
            for i in range(start, self.batches):
                try:
                    out = next(self._iterator)[0]
                except RuntimeError as e:
                    raise self._failure(e) from None
                if i < self._position:
                    continue
                self._position = i + 1
                yield _to_batch(out, self.cfg.out_target_size, self.device, self._masks(i))
        finally:
            self._iterator = None


def render_batch(
    images: list[torch.Tensor],
    theta: torch.Tensor,
    cfg: DataConfig,
    device: str = "cpu",
    device_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the DALI graph on given pixels and θ -> (view1, view2, targets), normalised, on the CPU.

    images: B decoded (3, H, W) uint8 tensors (sizes may differ); theta: (B, THETA_DIM). What the parity
    tests compare with `oracle.make_views` on the same inputs.
    """
    if theta.shape != (len(images), THETA_DIM):
        raise ValueError(
            f"render_batch: {len(images)} images need θ of shape ({len(images)}, {THETA_DIM}), "
            f"got {tuple(theta.shape)}"
        )
    hwc = [np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]
    th = theta.detach().cpu().float().numpy()
    pipe, names = build_pipeline(
        cfg, len(images), device, device_id, external=(lambda: hwc, lambda: [row.copy() for row in th])
    )
    pipe.build()
    # one batch, no reader: run the pipeline directly rather than through an epoch-counting iterator
    out = {
        name: torch.from_numpy(np.array((t.as_cpu() if device == "gpu" else t).as_array()))
        for name, t in zip(names, pipe.run())
    }
    targets = out.get("targets")
    if targets is None:
        targets = out["view1"].new_zeros(len(images), 0, 3, cfg.out_target_size, cfg.out_target_size)
    return out["view1"].cpu(), out["view2"].cpu(), targets.cpu()


def build_dali_loader(
    cfg: DataConfig,
    data_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> DaliLoader:
    """The DALI loader for this rank: the GPU pipeline for a CUDA device, the CPU pipeline otherwise; a
    ConfigError naming the install command when DALI does not import."""
    choose_loader("dali", rank)
    return DaliLoader(cfg, data_dir, rank, world_size, device)
