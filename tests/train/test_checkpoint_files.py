"""train/checkpoint.py on its own, with small real checkpoints: step files ordered by their step past
999,999, the checksum that catches damaged bytes, truncated files, leftovers of killed writes, files from
before 0.1.0's checkpoint format (refused), and the optimizer settings a resumed command overrides."""

from __future__ import annotations

import os
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CheckpointError
from train import checkpoint


def state(step: int) -> dict:
    """What loop.save_checkpoint writes, small: a 256 KB tensor so that files have real payloads."""
    gen = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(256, 256, generator=gen), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": step},
        "step": step,
        "epoch": step // 100,
        "rng": [checkpoint.rng_state()],
        "loader": [{"epoch": step // 100, "batch": step % 100}],
        "world_size": 1,
        "config": {"optim": {"base_lr": 0.005}},
    }


def names(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


def test_save_prune_and_newest_order_by_step_across_one_million(tmp_path):
    """From step 1,000,000 names have seven digits and sort before step-999500.pt as text."""
    ckpt = tmp_path / "run" / "ckpt"
    kept = []
    for step in (999_000, 999_500, 1_000_000, 1_000_500, 1_001_000):
        written = checkpoint.save(ckpt, state(step), step, keep=2)
        kept = [*kept, written.name][-2:]
        assert names(ckpt) == sorted(["last.pt", *kept]), step
        assert os.readlink(ckpt / "last.pt") == written.name
        path, newest = checkpoint.newest(tmp_path / "run")
        assert path == written and newest["step"] == step
    assert kept == ["step-1000500.pt", "step-1001000.pt"]
    assert [s for s, _ in checkpoint.step_files(ckpt)] == [1_000_500, 1_001_000]


def test_a_save_after_resuming_an_older_step_drops_the_abandoned_later_ones(tmp_path):
    """Resumed from step 2 of a run that reached 6: the next save is the newest; keep=1 keeps it."""
    ckpt = tmp_path / "ckpt"
    for step in (2, 4, 6):
        checkpoint.save(ckpt, state(step), step, keep=3)
    checkpoint.save(ckpt, state(3), 3, keep=1)
    assert names(ckpt) == ["last.pt", "step-000003.pt"]
    assert checkpoint.newest(tmp_path)[1]["step"] == 3


def test_stale_temporary_files_of_a_killed_write_are_removed_at_the_next_save(tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, state(2), 2, keep=2)
    stale = [ckpt / ".step-000004.pt.k3j9x1.tmp", ckpt / ".step-1000000.pt.a0b1c2.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # what kill -9 mid-write leaves
    checkpoint.save(ckpt, state(4), 4, keep=2)
    assert names(ckpt) == ["last.pt", "step-000002.pt", "step-000004.pt"]


def damage(path: Path, member: str = "") -> None:
    """XOR 64 bytes inside the largest tensor's record (or `member`'s), leaving the zip intact."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member) if member else max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start : start + 64] = bytes(b ^ 0x5A for b in raw[start : start + 64])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_damaged_tensor_bytes_is_refused_and_auto_skips_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, state(2), 2, keep=2)
    path = checkpoint.save(ckpt, state(4), 4, keep=2)
    assert torch.load(path, weights_only=True)["checksum"].startswith("sha256:")
    damage(path)
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(CheckpointError, match=r"--resume .*step-000004.pt: damaged: its contents differ"):
        checkpoint.read(path)
    with pytest.warns(RuntimeWarning, match="skipping .*step-000004.pt.*damaged"):
        found, older = checkpoint.newest(tmp_path)
    assert found.name == "step-000002.pt" and older["step"] == 2


def refusal(path: Path) -> str:
    """read's CheckpointError for path, checked to be one line."""
    with pytest.raises(CheckpointError) as err:
        checkpoint.read(path)
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    return str(err.value)


def test_a_checkpoint_without_a_checksum_is_refused_in_one_line(tmp_path):
    """Formatted but written before 0.1.0's checkpoint format had the checksum: nothing to verify."""
    path = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, **state(4)}, path)
    assert refusal(path) == (
        f"--resume {path}: no checksum: written by an eqrecon before 0.1.0's checkpoint format; start a new run"
    )


def test_a_checkpoint_without_the_format_key_is_refused_in_one_line(tmp_path):
    """Before the format key a checkpoint was the bare dict; its keys no longer make it one, checksum or not."""
    bare = state(4)
    path = tmp_path / "pre-format.pt"
    torch.save({**bare, "checksum": checkpoint.digest(bare)}, path)
    assert refusal(path) == (
        f"--resume {path}: not an eqrecon training checkpoint (keys checksum, config, epoch, loader, "
        "model, optimizer); an exported backbone cannot be resumed"
    )


def test_a_checkpoint_with_numpy_s_rng_tuple_is_refused_in_one_line(tmp_path):
    """Pre-format checkpoints pickled np.random.get_state() (an ndarray): weights_only loading refuses
    numpy's types, and read no longer lets them through, even in an otherwise well-formed file."""
    old = {"format": checkpoint.FORMAT, "version": 1, **state(4)}
    old["rng"] = [{**old["rng"][0], "numpy": np.random.get_state()}]
    path = tmp_path / "numpy-rng.pt"
    torch.save({**old, "checksum": checkpoint.digest(old)}, path)
    assert refusal(path).startswith(
        f"--resume {path}: not a readable training checkpoint, truncated or not written by eqrecon ("
    )


def test_an_optimizer_state_that_numbers_its_parameters_is_refused_in_one_line():
    """optimizer.state_dict() numbers the parameters 0, 1, ...; eqrecon saves them by name."""
    method = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(method.parameters())
    numbered = {"optimizer": optimizer.state_dict()}
    assert numbered["optimizer"]["param_groups"][0]["params"] == [0, 1]
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_param_groups(numbered, method, optimizer, "run/ckpt/last.pt")
    assert str(err.value) == (
        "--resume run/ckpt/last.pt: its optimizer state numbers the parameters instead of naming them "
        "(written by an eqrecon before 0.1.0's checkpoint format); start a new run"
    )
    named = {"optimizer": {"state": {}, "param_groups": [{"params": ["bias", "weight"]}]}}
    checkpoint.check_param_groups(named, method, optimizer, "run/ckpt/last.pt")  # the same groups, by name


@pytest.mark.parametrize("size", [1_000, 8_192, 20_000, "half"])
def test_a_truncated_checkpoint_is_a_checkpoint_error_that_auto_skips(tmp_path, size):
    """Cut to a few kB torch raises OSError (EINVAL) rather than its usual RuntimeError."""
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, state(2), 2, keep=2)
    path = checkpoint.save(ckpt, state(4), 4, keep=2)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 if size == "half" else size])
    with pytest.raises(CheckpointError, match="not a readable training checkpoint, truncated"):
        checkpoint.read(path)
    with pytest.warns(RuntimeWarning, match="skipping .*step-000004.pt"):
        assert checkpoint.newest(tmp_path)[1]["step"] == 2


def test_the_digest_sees_every_value_and_its_type():
    base = state(4)
    same = state(4)
    assert checkpoint.digest(base) == checkpoint.digest(same)
    changes = [
        lambda s: s["model"]["w"].view(-1)[1000].add_(1e-6),
        lambda s: s["model"].update(b=s["model"]["b"].float()),  # same values, another dtype
        lambda s: s["model"].update(w=s["model"]["w"].reshape(512, 128)),  # same bytes, another shape
        lambda s: s.update(step=4.0),
        lambda s: s["loader"][0].update(batch=5),
        lambda s: s.update(rng=tuple(s["rng"])),
    ]
    for i, change in enumerate(changes):
        other = state(4)
        change(other)
        assert checkpoint.digest(other) != checkpoint.digest(base), i


def test_optimizer_overrides_name_each_changed_setting_and_refuse_another_optimizer():
    saved = {"name": "adamw", "base_lr": 0.005, "betas": [0.9, 0.999], "epochs": 800, "clip_grad": 3.0}
    current = {"name": "adamw", "base_lr": 0.003, "betas": (0.9, 0.95), "epochs": 800.0, "clip_grad": 3.0}
    current["layer_decay"] = 0.9  # a field newer than the checkpoint: nothing to compare it with
    assert checkpoint.optimizer_overrides(saved, current) == [
        "--optim.base_lr=0.003 (was 0.005)",
        "--optim.betas=0.9,0.95 (was 0.9,0.999)",
    ]
    assert checkpoint.optimizer_overrides(saved, {**saved, "betas": (0.9, 0.999)}) == []
    with pytest.raises(
        CheckpointError, match="--optim.name=apex_lamb: the checkpoint's optimizer state is adamw's"
    ):
        checkpoint.optimizer_overrides(saved, {**saved, "name": "apex_lamb"})


def test_settings_applied_after_loading_give_the_config_s_schedule_at_the_restored_step():
    """An optimizer and LambdaLR built from one config, a state from another (lr 1.0, betas 0.5):
    after apply_settings the groups hold the built betas and weight decay and lr = base x factor(step)."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]

    def build(lr: float, betas: tuple[float, float]):
        opt = torch.optim.AdamW(
            [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
            lr=lr,
            betas=betas,
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))

    old_opt, old_sched = build(1.0, (0.5, 0.5))
    for _ in range(3):
        sum(p.sum() for p in params).backward()
        old_opt.step()
        old_sched.step()
    opt, sched = build(0.25, (0.9, 0.95))
    built = checkpoint.optimizer_settings(opt, sched)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old_sched.state_dict())
    assert opt.param_groups[0]["betas"] == (0.5, 0.5)  # what loading alone leaves
    checkpoint.apply_settings(opt, sched, built)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr() == [0.25 / 4] * 2
    assert sched.base_lrs == [0.25, 0.25] and opt.state[params[0]]["step"] == 3  # moments kept


def test_rng_state_round_trips_every_generator():
    state = checkpoint.rng_state()
    expected = (np.random.rand(3), torch.rand(3), random.random())
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    checkpoint.set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])
    assert random.random() == expected[2]
