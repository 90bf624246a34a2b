"""`train/main.py` as a user runs it: bad input ends in one actionable line on stderr, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train" / "main.py"), *args], cwd=cwd,
                          check=False, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_config_key(tmp_path):
    proc = run_main("--preset", "demo", "--model.lamda=2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unknown config key --model.lamda" in line and "lam" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--preset", "vits8-everything"], ["unknown preset 'vits8-everything'; choose from demo"]),
    (["--resume", "nowhere/ckpt/last.pt"], ["--resume nowhere/ckpt/last.pt: no such checkpoint"]),
    (["--steps", "many"], ["--run.steps=many: cannot parse as int"]),
])
def test_more_errors_in_process(args, words, capsys):
    from train.main import main  # the same entry point, without paying a process start per case

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no-shards-here"
    proc = run_main("--preset", "demo", "--device", "cpu", "--data", str(missing), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(missing) in line and "does not exist" in line and "pipeline.convert" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is visible")
def test_cuda_without_a_gpu(tmp_path):
    proc = run_main("--preset", "demo", "--device", "cuda", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "--device cuda" in line and "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_preset_without_a_gpu(tmp_path):
    proc = run_main("--preset", "vits16-path", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "vits16-path" in line and "no CUDA GPU" in line and "--device cpu" in line


def test_non_finite_loss_stops_the_run_naming_step_and_term(tmp_path, demo_shards):
    proc = run_main("--preset", "demo-vicreg", "--device", "cpu", "--data", str(demo_shards), "--out",
                    str(tmp_path / "run"), "--steps", "3", "--model.sim_coeff=nan", "--data.img_size=32")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss/inv = nan at step 1 ("), proc.stderr
    assert not (tmp_path / "run" / "ckpt").exists()  # nothing is saved from a poisoned step
