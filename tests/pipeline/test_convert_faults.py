"""pipeline.convert under the faults a user's machine has: its own output inside the source, a second
converter, odd directory entries, an output that cannot be written, Ctrl-C. Each must end in the
promised dataset or in one `error:` line naming the path at fault, never a traceback or silent loss."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import convert as cv
from pipeline.demo import PHOTOS
from pipeline.discover import LOCK, VAL_CSV
from pipeline.shard_write import write_shard

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "pipeline.convert"]


def class_folders(root: Path, classes=("cat", "coffee", "rocket"), per_class: int = 4) -> Path:
    """root/<class>/*.jpg with real photos (the "any folder of class folders" layout) -> root."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for photo in sorted((PHOTOS / "train" / c).glob("*.jpg"))[:per_class]:
            shutil.copy(photo, root / c / photo.name)
    return root


def run_cli(
    *args: str, timeout: float = 120, prefix: tuple[str, ...] = (), **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, *CLI, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        **kw,
    )


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert the process failed with exactly one `error:` line on stderr, holding every fragment."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply: root reads and writes through them."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def shards(meta: dict) -> list[tuple[str, str]]:
    return [(r["name"], r["sha256"]) for r in meta["shards"]]


# ------------------------------------------------------------------------- the output inside the source


def test_out_inside_src_is_neither_a_class_nor_images(tmp_path, monkeypatch):
    src = class_folders(tmp_path / "src")
    ref = cv.convert(src, tmp_path / "elsewhere", shard_size=4, workers=1, quiet=True)
    out = src / "wds"
    first = cv.convert(src, out, shard_size=4, workers=1, quiet=True)
    assert first["classes"] == ["cat", "coffee", "rocket"] and shards(first) == shards(ref)
    again = cv.convert(src, out, shard_size=4, workers=1, quiet=True)  # failed before: "wds" was a class
    assert again == first

    # interrupted, then resumed: the labels must not shift (they did by one, without a warning)
    real, calls = write_shard, []

    def dying(task):
        calls.append(task)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(task)

    resumed_out = src / "b-wds"  # sorts before "cat": as a class it would shift every label
    monkeypatch.setattr(cv, "write_shard", dying)
    with pytest.raises(cv.Interrupted):
        cv.convert(src, resumed_out, shard_size=4, workers=1, quiet=True)
    monkeypatch.undo()
    resumed = cv.convert(src, resumed_out, shard_size=4, workers=1, quiet=True)
    assert resumed["classes"] == ref["classes"] and shards(resumed) == shards(ref)
    assert not [
        x for x in resumed["skipped"] + resumed["ignored"] if "wds" in str(x)
    ]  # nor src/wds, an older output


def test_out_inside_the_train_folder_of_an_imagenet_layout(tmp_path):
    src = tmp_path / "imagenet"
    class_folders(src / "train", per_class=2)
    class_folders(src / "val", per_class=1)
    out = src / "train" / "wds"
    for _ in range(2):  # the second run finds the first one's output in train/ and must leave it alone
        meta = cv.convert(src, out, shard_size=4, workers=1, quiet=True)
        assert meta["classes"] == ["cat", "coffee", "rocket"] and not meta["skipped"] and not meta["ignored"]
        assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": 6, "val": 3}


@pytest.mark.integration  # launches the converter as a process
def test_out_that_is_src_is_refused(tmp_path):
    src = class_folders(tmp_path / "src", per_class=1)
    one_error_line(run_cli("--src", str(src), "--out", str(src)), str(src), "is --src itself")
    assert not (src / "dataset.json").exists()


# ------------------------------------------------------------------------------------------- the lock


def wait_for_lock(out: Path, pid: int, timeout: float = 60) -> None:
    """Until the converter with this pid holds the lock on out (it writes its pid into the lock file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if f"pid {pid} " in (out / LOCK).read_text():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"converter {pid} never took the lock on {out}")


@pytest.mark.integration  # launches the converter as a process
def test_second_converter_into_the_same_out_exits_at_once_naming_the_holder(tmp_path):
    every_class = sorted(p.name for p in (PHOTOS / "train").iterdir())
    src, out = class_folders(tmp_path / "src", every_class, per_class=8), tmp_path / "out"  # ~1 s of work
    first = subprocess.Popen(
        [*CLI, "--src", str(src), "--out", str(out), "--shard-size", "2", "--workers", "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_lock(out, first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # the holder is mid-conversion for as long as this test needs
        assert first.poll() is None, "the first converter finished before it could be paused"
        t0 = time.monotonic()
        second = run_cli("--src", str(src), "--out", str(out), "--shard-size", "2", "--workers", "1")
        line = one_error_line(second, str(out), f"pid {first.pid} on {socket.gethostname()}", "started")
        assert "another converter" in line and time.monotonic() - t0 < 30
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    cv.verify(out)  # the holder's dataset is whole: the second converter touched nothing
    assert (
        run_cli("--src", str(src), "--out", str(out), "--shard-size", "2", "--workers", "1").returncode == 0
    )


# ----------------------------------------------------------------------- entries that are not converted


@pytest.mark.integration  # launches the converter as a process
def test_every_entry_not_converted_is_recorded_with_its_reason(tmp_path):
    src = class_folders(tmp_path / "src")
    cat = src / "cat"
    with open(os.path.join(os.fsencode(cat), b"caf\xe9.jpg"), "wb") as f:  # Latin-1, not UTF-8
        f.write((PHOTOS / "train/cat/cat_train_05.jpg").read_bytes())
    os.mkdir(os.path.join(os.fsencode(src), b"r\xe9seau"))
    os.symlink("gone.jpg", cat / "dangling.jpg")
    os.symlink("self.jpg", cat / "self.jpg")
    os.symlink("..", cat / "loop")  # a folder that leads back to its parent
    os.mkfifo(cat / "pipe.jpg")  # reading it would block forever
    shutil.copy(
        PHOTOS / "train/cat/cat_train_06.jpg", cat / "._cat_train_00.jpg"
    )  # hidden: listed, not converted
    (src / "coffee" / ".cache").mkdir()
    shutil.copy(PHOTOS / "train/cat/cat_train_07.jpg", src / "coffee" / ".cache" / "x.jpg")
    (src / "coffee" / "locked.jpg").write_bytes((PHOTOS / "train/coffee/coffee_train_05.jpg").read_bytes())
    (src / "coffee" / "locked.jpg").chmod(0)
    (src / "rocket" / "closed").mkdir()
    shutil.copy(PHOTOS / "train/rocket/rocket_train_05.jpg", src / "rocket" / "closed" / "x.jpg")
    (src / "rocket" / "closed").chmod(0)
    out = tmp_path / "out"
    try:
        proc = run_cli(
            "--src", str(src), "--out", str(out), "--shard-size", "4", "--workers", "2", prefix=unprivileged()
        )
    finally:
        (src / "rocket" / "closed").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "dataset.json").read_text())
    got = {x["path"]: x["reason"] for x in meta["skipped"]}
    want = {
        "cat/caf\\xe9.jpg": "file name is not valid UTF-8",
        "r\\xe9seau": "folder name is not valid UTF-8",
        "cat/dangling.jpg": "dangling symlink: its target 'gone.jpg' does not exist",
        "cat/self.jpg": "symlink loop",
        "cat/loop": "symlink loop: leads back to",
        "cat/pipe.jpg": "not a regular file",
        "coffee/locked.jpg": "unreadable: Permission denied",
        "rocket/closed": "unreadable folder: Permission denied",
    }
    assert set(got) == set(want), got
    for path, reason in want.items():
        assert got[path].startswith(reason), (path, got[path])
        assert f"skipped {path}: {reason}" in proc.stdout  # the summary names each one too
    assert meta["classes"] == ["cat", "coffee", "rocket"] and meta["splits"]["train"]["count"] == 12
    assert meta["ignored"] == ["cat/._cat_train_00.jpg", "coffee/.cache/"]
    assert meta["splits"]["train"]["skipped"] == len(want)


def test_val_csv_naming_an_unknown_wnid_says_so(tmp_path):
    src = tmp_path / "src"
    (src / "train" / "n01").mkdir(parents=True)
    (src / "val").mkdir()
    shutil.copy(PHOTOS / "train/cat/cat_train_00.jpg", src / "train/n01/a.JPEG")
    for i in (1, 2, 3):
        shutil.copy(PHOTOS / "val/cat/cat_val_00.jpg", src / f"val/ILSVRC2012_val_{i:08d}.JPEG")
    (src / VAL_CSV).write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 2 3 4\nILSVRC2012_val_00000002,n99 1 2 3 4\n"
    )
    meta = cv.convert(src, tmp_path / "out", workers=1, quiet=True)
    got = {x["path"]: x["reason"] for x in meta["skipped"]}
    assert got == {
        "val/ILSVRC2012_val_00000002.JPEG": f"unknown class: {VAL_CSV} labels it 'n99', which is not a train class",
        "val/ILSVRC2012_val_00000003.JPEG": f"no label: 'ILSVRC2012_val_00000003' is not in {VAL_CSV}",
    }
    assert meta["splits"]["val"] == {"count": 1, "shards": 1, "skipped": 2}


# ------------------------------------------------------------------------------ output-side OS errors


@pytest.mark.integration  # launches the converter as a process
def test_out_that_is_a_file_or_below_a_file(tmp_path):
    src, blocker = class_folders(tmp_path / "src", per_class=1), tmp_path / "a-file"
    blocker.write_text("x")
    one_error_line(run_cli("--src", str(src), "--out", str(blocker)), str(blocker), "is a file, not a folder")
    one_error_line(run_cli("--src", str(src), "--out", str(blocker / "out")), str(blocker), "cannot write")


@pytest.mark.integration  # launches the converter as a process
@pytest.mark.parametrize("where", ["out", "parent"])
def test_read_only_out(tmp_path, where):
    src, folder = class_folders(tmp_path / "src", per_class=1), tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    out = folder if where == "out" else folder / "new"
    try:
        proc = run_cli("--src", str(src), "--out", str(out), prefix=unprivileged())
    finally:
        folder.chmod(0o755)
    one_error_line(proc, str(out), "Permission denied", "not writable")


def limit_file_size(limit: int):
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG (File too large)
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 120 KB file system: a real full disk (ENOSPC). Needs root and a kernel that lets it mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mnt)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root); the EFBIG test covers the same path")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.integration  # launches the converter as a process
@pytest.mark.parametrize("fault", ["file_size_limit", "full_disk"])
def test_full_disk_is_one_line_and_a_rerun_completes(tmp_path, request, fault):
    src = class_folders(tmp_path / "src", per_class=6)  # ~330 KB of JPEGs, ~55 KB per shard
    ref = cv.convert(src, tmp_path / "ref", shard_size=3, workers=1, quiet=True)
    if fault == "full_disk":
        out = request.getfixturevalue("small_tmpfs") / "out"
        proc = run_cli("--src", str(src), "--out", str(out), "--shard-size", "3", "--workers", "2")
        one_error_line(proc, str(out), "No space left on device", "free some space")
        shutil.copytree(out, tmp_path / "moved")  # what a user does: move the partial output to a bigger disk
        out = tmp_path / "moved"
    else:
        out = tmp_path / "out"
        proc = run_cli(
            "--src",
            str(src),
            "--out",
            str(out),
            "--shard-size",
            "3",
            "--workers",
            "2",
            preexec_fn=limit_file_size(40_000),
        )
        one_error_line(proc, str(out), "File too large", "file-size limit")
    assert not list(out.glob("*.tmp")), "a failed shard write must give its space back"
    assert not (out / "dataset.json").exists()
    again = cv.convert(src, out, shard_size=3, workers=2, quiet=True)
    assert shards(again) == shards(ref) and again["splits"] == ref["splits"]
    cv.verify(out)


# ------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.integration  # launches the converter as a process
@pytest.mark.slow
def test_ctrl_c_in_a_resumed_two_worker_run(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) at several moments of a
    resumed --workers 2 run: the converter stops within seconds with one line and exit 130 (or had
    already finished), and the next run gives exactly the dataset of an uninterrupted one."""
    src = class_folders(tmp_path / "src", classes=("cat", "coffee", "rocket", "galaxy"), per_class=8)
    args = ["--shard-size", "2", "--workers", "2", "--seed", "5"]
    ref = cv.convert(src, tmp_path / "ref", shard_size=2, workers=2, seed=5, quiet=True)
    for n, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.6, 1.0)):
        out = tmp_path / f"out{n}"
        shutil.copytree(tmp_path / "ref", out)
        for victim in sorted(out.glob("*.tar"))[::3]:  # an interrupted earlier run: a third still to write
            victim.unlink()
        proc = subprocess.Popen(
            [*CLI, "--src", str(src), "--out", str(out), *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        wait_for_lock(out, proc.pid)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"delay {delay}: the converter hung after Ctrl-C") from None
        assert time.monotonic() - t0 < 10, delay
        assert "Traceback" not in err, (delay, err)
        if proc.returncode != 0:
            assert proc.returncode == 130, (delay, err)
            assert err.strip().splitlines()[-1].startswith("error: interrupted"), (delay, err)
        again = cv.convert(src, out, shard_size=2, workers=2, seed=5, quiet=True)
        assert again == ref, delay
        cv.verify(out)
