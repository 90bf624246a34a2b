"""DALI is optional: data.loader=auto falls back to the reference loader with one warning, and
data.loader=dali without DALI is one ConfigError naming the install command. The checks run in a
subprocess whose imports of nvidia.dali are blocked (tests/pipeline/block_dali.py), together with the
reference loader's own tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline import DALI_INSTALL, build_loader, dali_available
from pipeline.batch import DataConfig
from pipeline.errors import ConfigError
from pipeline.path import PathConfig
from pipeline.reference import ReferenceLoader

HERE = Path(__file__).parent


def _cfg(data_dir, loader: str) -> DataConfig:
    return DataConfig(
        dir=str(data_dir),
        loader=loader,
        img_size=16,
        batch_size=8,
        workers=0,
        aug=PathConfig(transforms=("rotation",), k=0),
    )


def test_without_dali_auto_is_the_reference_loader_and_dali_is_one_error_line(demo_shards):
    if dali_available():
        pytest.skip("DALI imports here; test_dali_is_optional runs this test with DALI blocked")
    with pytest.warns(
        UserWarning, match="DALI is not installed: data.loader=auto uses the PyTorch reference"
    ):
        loader = build_loader(_cfg(demo_shards, "auto"), rank=0)
    assert isinstance(loader, ReferenceLoader) and len(next(iter(loader))) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 1 stays quiet
        assert isinstance(build_loader(_cfg(demo_shards, "auto"), rank=1, world_size=2), ReferenceLoader)
    with pytest.raises(ConfigError) as err:
        build_loader(_cfg(demo_shards, "dali"))
    assert DALI_INSTALL in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImportError):
        import nvidia.dali  # noqa: F401


def test_with_dali_auto_is_dali(demo_shards):
    if not dali_available():
        pytest.skip("DALI is not installed")
    from pipeline.dali import DaliLoader

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(build_loader(_cfg(demo_shards, "auto"), device="cpu"), DaliLoader)


@pytest.mark.integration
@pytest.mark.slow
def test_dali_is_optional():
    """This file's no-DALI test and the reference loader's main tests (batches, resume, bad shards), in a
    process where DALI does not import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    tests = [
        f"{HERE / 'test_optional_dali.py'}::test_without_dali_auto_is_the_reference_loader_and_dali_is_one_error_line",
        str(HERE / "test_reference.py"),
        "-k",
        "one_error_line or documented_batch or resume or corrupt",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "block_dali", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]  # "5 passed, 12 deselected in 9.7s": none skipped
    assert re.fullmatch(r"5 passed, \d+ deselected in .*", summary), run.stdout[-500:]
