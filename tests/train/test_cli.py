"""`train/main.py` as a user runs it: bad input ends in one actionable line on stderr, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import MAIN, ROOT, cpu_args


def run_main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.integration
def test_unknown_config_key(tmp_path):
    proc = run_main("--preset", "demo", "--model.lamda=2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unknown config key --model.lamda" in line and "lam" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "vits8-everything"], ["unknown preset 'vits8-everything'; choose from demo"]),
        (["--resume", "nowhere/ckpt/last.pt"], ["--resume nowhere/ckpt/last.pt: no such checkpoint"]),
        (["--steps", "many"], ["--run.steps=many: cannot parse as int"]),
    ],
)
def test_more_errors_in_process(args, words, capsys):
    from train.main import main  # the same entry point, without paying a process start per case

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


@pytest.mark.integration
def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no-shards-here"
    proc = run_main(
        "--preset", "demo", "--device", "cpu", "--data", str(missing), "--out", str(tmp_path / "run")
    )
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(missing) in line and "does not exist" in line and "pipeline.convert" in line


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is visible")
def test_cuda_without_a_gpu(tmp_path):
    proc = run_main("--preset", "demo", "--device", "cuda", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "--device cuda" in line and "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_preset_without_a_gpu(tmp_path):
    proc = run_main("--preset", "vits16-path", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "vits16-path" in line and "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.integration
def test_non_finite_loss_stops_the_run_naming_step_and_term(tmp_path, demo_shards):
    proc = run_main(
        *cpu_args("demo-vicreg", data=demo_shards, out=tmp_path / "run", steps=3),
        "--model.sim_coeff=nan",
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss/inv = nan at step 1 ("), (
        proc.stderr
    )
    assert not (tmp_path / "run" / "ckpt").exists()  # nothing is saved from a poisoned step


# --- discoverable: --help, --print-config, --config ------------------------------------------------


def leaf_keys(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, f"{prefix}{f.name}.")
        elif prefix:
            yield prefix + f.name, value


def test_help_lists_every_field_with_type_and_default_and_every_preset(capsys):
    from train.cli import parse_config
    from train.config import Config
    from train.recipes import PRESETS

    with pytest.raises(SystemExit) as done:
        parse_config(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for key, value in leaf_keys(Config()):
        line = next((line for line in lines if line.strip().startswith(f"--{key}=")), None)
        assert line is not None, f"--{key} is missing from --help"
        shown = (
            ",".join(map(str, value))
            if isinstance(value, tuple)
            else str(value).lower()
            if isinstance(value, bool)
            else (str(value) or '""')
        )
        assert shown in line, (key, line)
    assert "--model.depth=INT" in text and "--data.aug.blur_sigma=FLOAT,FLOAT" in text
    assert "--model.expander=INT,..." in text and "--run.tensorboard=BOOL" in text
    assert any("0 = the timm model's depth" in line for line in lines if "--model.depth=" in line)
    for section in ("  run:", "  data:", "  data.aug:", "  model:", "  optim:"):
        assert section in lines
    for name in PRESETS:
        assert any(line.startswith(f"  {name} ") and len(line.split()) > 3 for line in lines), name
    assert "75 preempted" in text


def test_help_shows_a_presets_values_when_one_is_given(capsys):
    from train.cli import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--preset", "demo", "--help"])
    line = next(line for line in capsys.readouterr().out.splitlines() if "--data.img_size=" in line)
    assert " 64 " in line


def test_print_config_round_trips_through_config(tmp_path, capsys):
    import json

    from train.cli import parse_config

    with pytest.raises(SystemExit) as done:
        parse_config(
            [
                "--preset",
                "demo-sie",
                "--model.lam=0.25",
                "--data.aug.transforms=rotation,blur",
                "--steps",
                "7",
                "--print-config",
            ]
        )
    assert done.value.code == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "cfg.json"
    saved.write_text(printed)
    cfg = parse_config(["--config", str(saved)])
    assert cfg.preset == "demo-sie" and cfg.model.lam == 0.25 and cfg.run.steps == 7
    assert cfg.data.aug.transforms == ("rotation", "blur")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(saved), "--print-config"])
    assert json.loads(capsys.readouterr().out) == json.loads(printed)
    assert parse_config(["--config", str(saved), "--model.lam=2"]).model.lam == 2.0  # overrides on top

    import yaml

    as_yaml = tmp_path / "cfg.yaml"
    as_yaml.write_text(yaml.safe_dump(json.loads(printed)))
    assert parse_config(["--config", str(as_yaml)]) == cfg


@pytest.mark.integration
def test_a_runs_config_json_with_provenance_is_a_config_base(tmp_path):
    """What a run saves: the config plus its provenance (versions, device, kernel path, git SHA)."""
    import json

    from train.cli import parse_config
    from train.distributed import Env
    from train.recipes import load_config
    from train.runlog import RunLog

    cfg = load_config("demo-xattn", ["--model.lam=0.5"])
    RunLog(tmp_path, cfg, Env(), 0, 1).close()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kernels"] == "ref" and saved["device"] == "cpu" and saved["device_name"]
    assert (
        saved["versions"]["torch"] == torch.__version__
        and {"triton", "dali", "cuda", "python"} <= saved["versions"].keys()
    )
    assert "git_sha" in saved and saved["world_size"] == 1
    assert parse_config(["--config", str(tmp_path / "config.json")]) == cfg

    cfg.run.resume = str(tmp_path / "ckpt" / "step-000004.pt")  # what a resumed run's config.json holds
    RunLog(tmp_path, cfg, Env(), 0, 1).close()
    assert parse_config(["--config", str(tmp_path / "config.json")]).run.resume == ""  # repeats, not resumes


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"preset": "demo", "model": {"lamda": 2}}', ["unknown key model.lamda", "lam"]),
        ('{"preset": "demo", "data": {"batch_size": "big"}}', ["data.batch_size='big' is not a int"]),
        ('{"preset": "demo", "model": {"depth": -1}}', ["--model.depth=-1 must be >= 0"]),
        ("{not json", ["not valid JSON"]),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, content, words, capsys):
    from train.main import main

    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err, err
    assert main(["--config", str(path), "--preset", "demo"]) == 2
    assert "pass one of them" in capsys.readouterr().err


@pytest.mark.integration
def test_resume_auto_with_config_is_one_command_for_start_and_requeue(tmp_path, demo_shards):
    """The same command line starts the run and, once a checkpoint exists, continues it."""
    import json

    from train.cli import parse_config
    from train.main import main

    base = tmp_path / "base.json"
    cfg = parse_config(["--preset", "demo", "--data.img_size=32", "--data.batch_size=32", "--optim.epochs=2"])
    base.write_text(json.dumps(__import__("train.config", fromlist=["to_dict"]).to_dict(cfg)))
    command = [
        "--config",
        str(base),
        "--resume",
        "auto",
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--data",
        str(demo_shards),
    ]
    assert main([*command, "--steps", "1"]) == 0
    resumed = parse_config(command)
    assert resumed.run.resume.endswith("step-000001.pt") and resumed.run.out == str(tmp_path / "run")
    assert main(command) == 0
    assert torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)["step"] == 4


def test_a_truncated_shard_under_the_default_loader_is_one_line(tmp_path, demo_shards, capsys):
    """DALI's ShardError is a UserError: one line naming the shard, as under the reference loader."""
    import shutil

    from train.main import main

    data = tmp_path / "shards"
    shutil.copytree(demo_shards, data)
    shard = min(data.glob("train-*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert (
        main(
            [
                *cpu_args(data=data, out=tmp_path / "run", steps=1),
                "--data.loader=dali",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(shard) in err and "truncated" in err, (
        err
    )
