"""The PyTorch reference pipeline: shards -> `Batch`, with pipeline.path's semantics in plain torch.

The pixel oracle (`decode`, `crop_resize`, `apply_g`, `make_views`: pipeline/oracle.py) is what the
DALI pipeline is tested against; pipeline/multicrop.py builds the DINO family's crops on it; this
module is the loader alone: `build_reference_loader` wraps them in a webdataset + DataLoader loader.

Sharding. `pipeline.shards` gives this rank its contiguous sample range of the epoch and the epoch
length L, the rule the DALI loader follows too. The rank's L batches are dealt to its DataLoader
workers ("streams", workers=0 is one stream in-process) as evenly as possible, and each stream reads
the consecutive part of the range that holds its batches (the last one also the range's remainder).
Every epoch a stream shuffles the order of its tar pieces and passes the samples through a shuffle
buffer (seeded by seed, epoch, rank, stream; data.shuffle_buffer samples in all, split over the
streams) and cuts them into batches of b = batch_size // world_size. The DataLoader interleaves the
streams round-robin (`interleave`).

Randomness. θ (crop boxes, flips, g) for a sample depends only on (seed, epoch, key), so a sample is
augmented the same way whatever the rank or worker count. Batch composition depends on the worker
count (the range is split by worker); with the same seed and settings the batches are identical.

Resume. `state_dict()` holds (epoch, batches handed out) and changes nothing, so it may be taken on
any batch, an epoch's last included; `set_epoch` never rewinds the epoch the loader is in. A resumed
iteration makes each stream skip the samples it had already handed out (tar reading only, nothing
decoded) and rotates the worker roles so the round-robin continues with the stream that was next: the
rest of the epoch is the same as in an uninterrupted run. A DALI state resumes here too (same rule,
same length), with this loader's batches from its position on.
"""

from __future__ import annotations

import random
import signal
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batch import Batch, DataConfig
from pipeline.errors import ConfigError, DataError
from pipeline.multicrop import multicrop_sample
from pipeline.oracle import decode, make_views, sample_theta_for, seed_of
from pipeline.path import (
    validate,
)
from pipeline.shards import Shard, epoch_length, parse_label, pieces, rank_range, read_shard, split_shards


def render_sample(sample: dict, cfg: DataConfig, epoch: int) -> tuple:
    """A webdataset sample {__key__, jpg, cls} -> (view1, view2, targets, θ, label); label -1 without cls.
    With cfg.multicrop.enabled: (view1, view2, targets, θ, label, local (L, 3, h, w), masks (2, N) or
    None), pipeline/multicrop.py's rendering (its θ is the one drawn without multi-crop)."""
    key = sample["__key__"]
    img = decode(sample.get("jpg", b""), key)
    where = f"sample {key!r} in {sample.get('__url__', '?')}"
    label = parse_label(sample["cls"], where) if "cls" in sample else -1
    if cfg.multicrop.enabled:
        view1, view2, targets, theta, local, masks = multicrop_sample(img, key, cfg, cfg.multicrop, epoch)
        return view1, view2, targets, theta, label, local, masks
    theta = sample_theta_for(key, tuple(img.shape[-2:]), cfg, epoch)
    return (*make_views(img, theta, cfg), theta, label)


# ---------------------------------------------------------------------------------------------------
# The loader


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of bufsize samples."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def interleave(counts: Sequence[int]) -> list[int]:
    """The DataLoader's order over streams with counts[s] batches: round-robin, skipping exhausted ones."""
    left, order = list(counts), []
    while any(left):
        for s, c in enumerate(left):
            if c:
                order.append(s)
                left[s] -= 1
    return order


Piece = tuple[Shard, int, int]  # samples start..stop-1 of one tar


def plan_streams(
    shards: list[Shard], rank: int, world_size: int, epoch: int, per_rank_batch: int, streams: int
) -> tuple[list[list[Piece]], list[int]]:
    """This rank's epoch as (the tar pieces each stream reads, the batches each stream yields).

    Stream s yields L // streams batches, one more for the first L % streams, and reads the consecutive
    samples that hold them; the last stream also reads the rest of the rank's range.
    """
    total = sum(s.count for s in shards)
    lo, hi = rank_range(total, rank, world_size, epoch)
    length = epoch_length(total, world_size, per_rank_batch)
    quota = [length // streams + (s < length % streams) for s in range(streams)]
    parts, start = [], lo
    for s, q in enumerate(quota):
        stop = hi if s == streams - 1 else start + q * per_rank_batch
        parts.append(pieces(shards, start, stop))
        start = stop
    return parts, quota


class _RankStreams(IterableDataset):
    """This rank's streams for one (partial) epoch; DataLoader worker w plays stream (w + rotate) % W."""

    def __init__(
        self,
        cfg: DataConfig,
        parts: list[list[Piece]],
        per_rank_batch: int,
        rank: int,
        epoch: int,
        quota: list[int],
        skip: list[int],
        rotate: int,
    ):
        self.cfg, self.parts, self.per_rank_batch = cfg, parts, per_rank_batch
        self.rank, self.epoch, self.quota, self.skip, self.rotate = rank, epoch, quota, skip, rotate

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        assert n_workers == len(self.parts), "one DataLoader worker per stream"
        yield from self._stream((worker + self.rotate) % len(self.parts))

    def _stream(self, s: int) -> Iterator[Batch]:
        b, cfg = self.per_rank_batch, self.cfg
        rng = random.Random(seed_of("shuffle", cfg.seed, self.epoch, self.rank, s))
        parts = list(self.parts[s])
        rng.shuffle(parts)
        samples = (
            x for shard, start, stop in parts for x in read_shard(shard.path, shard.count, start, stop)
        )
        samples = _shuffled(samples, max(1, cfg.shuffle_buffer // len(self.parts)), rng)
        for i in range(self.quota[s]):
            chunk = [next(samples) for _ in range(b)]  # the plan holds quota·b samples: never exhausted
            if i < self.skip[s]:
                continue  # handed out before the resume point: read, never decoded
            rendered = [render_sample(x, cfg, self.epoch) for x in chunk]
            views1, views2, targets, thetas, labels = list(zip(*rendered))[:5]
            batch = Batch(
                torch.stack(views1),
                torch.stack(views2),
                torch.stack(targets),
                torch.stack(thetas),
                torch.tensor(labels, dtype=torch.int64),
            )
            if cfg.multicrop.enabled:
                from pipeline.multicrop import collate_multicrop

                batch = collate_multicrop(batch, [r[5:] for r in rendered])
            yield batch


def leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM, SIGUSR1 and SIGINT: the main process decides when to stop
    (the trainer checkpoints first) and shuts its workers down. torchrun's agent and Slurm signal the
    whole process group; a worker that died of it (torch's own SIGTERM handler exits quietly) took
    the main process down in the DataLoader before it could checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _clean(e: DataError) -> str:
    # A DataLoader worker's exception comes back with the worker traceback in its message; keep the
    # last line, which is ours ("pipeline.errors.ShardError: shard ... is corrupt ...").
    last = str(e).strip().splitlines()[-1]
    return last.split("Error: ", 1)[-1] if last.startswith("pipeline.errors.") else last


class ReferenceLoader:
    """`pipeline.Loader` over webdataset shards; see the module docstring for sharding and resume."""

    def __init__(
        self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, shards: list[Shard]
    ):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.shards, self.streams = shards, max(1, cfg.workers)
        self.per_rank_batch = cfg.batch_size // world_size
        self.length = epoch_length(sum(s.count for s in shards), world_size, self.per_rank_batch)
        self.epoch, self.position = 0, 0  # batches of self.epoch handed out
        self._positioned = (
            False  # set_epoch / load_state_dict chose the position the next iteration starts at
        )

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Make `epoch` the one the next iteration reads: another epoch starts at its first batch, the
        current one keeps its position (a running, resumed or finished epoch is never rewound)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self._positioned = True

    def _settings(self) -> dict:
        return {
            "loader": "reference",
            "seed": self.cfg.seed,
            "split": self.cfg.split,
            "batch_size": self.cfg.batch_size,
            "world_size": self.world_size,
            "workers": self.streams,
        }

    def state_dict(self) -> dict:
        """{epoch, batch (handed out in that epoch, up to len(self))}: read-only, so a checkpoint taken on
        an epoch's last batch neither ends the running iteration nor skips or replays an epoch."""
        return {"epoch": self.epoch, "batch": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at (epoch, batch). A state saved by the DALI loader means the same position (both
        loaders follow pipeline.shards: same ranges, same epoch length); the rest of the epoch is this
        loader's batches from there."""
        prior = (self.epoch, self.position) if self._positioned else None
        foreign = state.get("loader") == "dali"
        if foreign:
            warnings.warn(
                f"resuming the reference loader from a {state.get('loader')} loader state: batch "
                f"{state['batch']} of epoch {state['epoch']}, with this loader's sample order",
                stacklevel=2,
            )
        for name, value in self._settings().items():
            if foreign and name in ("loader", "workers"):
                continue
            if state.get(name) != value:
                raise ConfigError(
                    f"cannot resume the reference loader: saved {name}={state.get(name)!r}, "
                    f"now {value!r}; the position is only meaningful with the same data settings"
                )
        if not 0 <= state["batch"] <= self.length:
            raise ConfigError(f"cannot resume at batch {state['batch']}: the epoch has {self.length} batches")
        self.epoch, self.position = state["epoch"], state["batch"]
        if prior == (state["epoch"] - 1, 0) and state["batch"] == 0:
            # Written before state_dict became read-only: a checkpoint on epoch e's last batch stored
            # (e + 1, 0). The trainer's set_epoch(e) just before says which: it is the end of epoch e.
            self.epoch, self.position = prior[0], self.length
        self._positioned = True

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch. An epoch that an earlier iteration finished is followed by the
        next one (a plain loop over epochs); one restored as finished yields nothing (its empty rest)."""
        if self.position >= self.length and not self._positioned:
            self.epoch, self.position = self.epoch + 1, 0
        self._positioned = False
        if self.position >= self.length:
            return
        parts, quota = plan_streams(
            self.shards, self.rank, self.world_size, self.epoch, self.per_rank_batch, self.streams
        )
        order = interleave(quota)
        skip = [order[: self.position].count(s) for s in range(self.streams)]
        dataset = _RankStreams(
            self.cfg,
            parts,
            self.per_rank_batch,
            self.rank,
            self.epoch,
            quota,
            skip,
            rotate=order[self.position],
        )
        workers = max(0, self.cfg.workers)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            worker_init_fn=leave_stop_signals_to_the_parent,
        )
        it, error = iter(loader), None
        try:
            while self.position < self.length:
                try:
                    batch = next(it)
                except DataError as e:
                    error = type(e)(_clean(e))  # a worker's error comes back as its class, message wrapped
                    # the worker's traceback is a reference cycle holding `it`: stop the workers now,
                    # not whenever the garbage collector gets to it
                    getattr(it, "_shutdown_workers", lambda: None)()
                    break
                except StopIteration:
                    error = DataError(
                        f"rank {self.rank}: streams ended after {self.position} of {self.length} batches"
                    )
                    break
                self.position += 1
                yield batch.to(self.device)
        finally:
            del it  # shuts the workers down, also when the consumer stops early
        if error:
            raise error


# ---------------------------------------------------------------------------------------------------
# Entry point


def build_reference_loader(
    cfg: DataConfig,
    data_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> ReferenceLoader:
    """The PyTorch loader for `rank` of `world_size` over cfg.split's shards in data_dir."""
    validate(cfg.aug)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    per_rank_batch = cfg.batch_size // world_size
    if per_rank_batch < 1:
        raise ConfigError(
            f"data.batch_size={cfg.batch_size} leaves no sample per rank with {world_size} ranks"
        )
    data_dir = Path(data_dir)
    shards = split_shards(data_dir, cfg.split)
    total = sum(s.count for s in shards)
    if epoch_length(total, world_size, per_rank_batch) == 0:
        raise ConfigError(
            f"{data_dir}: {total} {cfg.split} samples over {world_size} rank(s) cannot fill one batch "
            f"of {per_rank_batch} per rank; lower data.batch_size"
        )
    return ReferenceLoader(cfg, rank, world_size, torch.device(device), shards)


__all__ = ["ReferenceLoader", "build_reference_loader", "interleave", "plan_streams", "render_sample"]
