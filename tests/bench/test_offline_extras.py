"""bench/offline_extras.sh and its list: complete against DALI's own metadata, parts of at most the part
size with checksums, and an install that checks them and names what is missing or damaged."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "offline_extras.sh"
LIST = ROOT / "bench" / "offline_extras.txt"
DALI = "nvidia-dali-cuda130"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed() -> tuple[dict[str, str], set[str]]:
    """({name: pinned version}, provided names) from bench/offline_extras.txt."""
    pins, provided = {}, set()
    for line in LIST.read_text().splitlines():
        if line.startswith("# provided:"):
            provided |= {_norm(n) for n in line.removeprefix("# provided:").split()}
        elif line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[_norm(req.name)] = str(req.specifier).removeprefix("==")
    return pins, provided


def _closure(name: str, extras: frozenset = frozenset()) -> dict[str, str]:
    """Every distribution `name[extras]` needs, recursively, as installed here: {name: version}."""
    found, todo = {}, [(name, extras)]
    while todo:
        dist_name, dist_extras = todo.pop()
        dist = md.distribution(dist_name)
        key = _norm(dist.metadata["Name"])
        if key in found and not dist_extras:
            continue
        found[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (dist_extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def test_list_covers_everything_dali_imports_at_the_installed_versions():
    pytest.importorskip("nvidia.dali")
    pins, provided = _listed()
    if md.version(DALI) != pins[DALI]:  # e.g. `make test-lowest`, which installs the lowest allowed DALI
        pytest.skip(f"the list is for {DALI}=={pins[DALI]}; {md.version(DALI)} is installed here")
    needed = _closure(DALI)
    for name in ("webdataset", "braceexpand"):
        needed.update(_closure(name))
    missing = sorted(set(needed) - set(pins) - provided)
    assert not missing, f"bench/offline_extras.txt lacks {missing} (needed by {DALI} as installed here)"
    for must in (
        "optree",
        "gast",
        "astunparse",
        "nvidia-nvjpeg",
        "nvidia-libnvcomp-cu13",
        "nvidia-nvjpeg2k-cu13",
        "nvidia-nvtiff-cu13",
        "nvidia-nvimgcodec-cu13",
        "webdataset",
        "braceexpand",
    ):
        assert must in pins, must
    stale = {n: (v, needed[n]) for n, v in pins.items() if n in needed and v != needed[n]}
    assert not stale, f"pins differ from the versions installed and tested here (pinned, installed): {stale}"


def _fake_wheel(folder: Path, dist: str, module: str, payload: int = 3000) -> None:
    """A minimal pure-Python wheel whose module holds `payload` random bytes (so parts are several)."""
    tag = f"{dist}-1.0"
    with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{module}/__init__.py", f"BLOB = {os.urandom(payload).hex()!r}\n")
        whl.writestr(f"{tag}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        whl.writestr(
            f"{tag}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{tag}.dist-info/RECORD", "")


def _run(*args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


@pytest.fixture
def packed(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    _fake_wheel(house, "nvidia_dali_fake", "nvidia/dali")
    _fake_wheel(house, "webdataset", "webdataset")
    listing = tmp_path / "list.txt"
    listing.write_text("nvidia-dali-fake\nwebdataset\n")
    env = {"WHEELHOUSE": str(house), "LIST": str(listing), "PART_SIZE": "4k"}
    done = _run("pack", str(tmp_path / "parts"), env=env)
    assert done.returncode == 0, done.stderr
    return tmp_path / "parts", env


@pytest.mark.integration
def test_pack_cuts_checksummed_parts_and_install_verifies_them(packed, tmp_path):
    parts, env = packed
    files = sorted(parts.glob("p[0-9]*"))
    assert len(files) >= 2 and all(f.stat().st_size <= 4096 for f in files)
    sums = (parts / "SHA256SUMS").read_text()
    assert all(f" {f.name}\n" in sums for f in files) and ".whl" in sums
    assert (parts / "MANIFEST").read_text().split() == [
        "nvidia_dali_fake-1.0-py3-none-any.whl",
        "webdataset-1.0-py3-none-any.whl",
    ]
    done = _run("install", str(parts), str(tmp_path / "site"), env=env)
    assert done.returncode == 0, done.stderr
    assert "import nvidia.dali works" in done.stdout and (tmp_path / "site" / "nvidia" / "dali").is_dir()


@pytest.mark.integration
def test_install_names_a_damaged_part(packed, tmp_path):
    parts, env = packed
    with open(parts / "p2", "r+b") as f:
        f.write(b"X")
    done = _run("install", str(parts), str(tmp_path / "site"), env=env)
    assert (
        done.returncode == 1
        and done.stderr.startswith("error: damaged or missing part(s)")
        and "p2" in done.stderr
    )


@pytest.mark.integration
def test_install_names_a_package_without_its_wheel(packed, tmp_path):
    parts, env = packed
    listing = Path(env["LIST"])
    listing.write_text(listing.read_text() + "optree==0.20.0\n")
    done = _run("install", str(parts), str(tmp_path / "site"), env=env)
    assert done.returncode == 1 and "lack wheels for: optree==0.20.0" in done.stderr
