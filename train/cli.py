"""The trainer's command line: flags -> a resolved Config, with help generated from the config tree.

    python train/main.py [--preset NAME | --config FILE.json|yaml] [--resume PATH|auto] [--print-config]
                         [--data DIR] [--out DIR] [--device auto|cpu|cuda] [--steps N] [--section.field=VALUE ...]

The base config is, in this order of precedence: the checkpoint's (--resume), a saved file's
(--config: `--print-config` output or a run's config.json), or a named preset (default demo).
Overrides apply on top. `--help` lists every field of the dataclass tree with its type, default and
the comment beside it in the source, grouped by section, and every preset with its docstring: the
dataclasses stay the one source of truth.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from train import checkpoint
from train.checks import check_model
from train.config import Config, from_dict, to_dict
from train.recipes import PRESETS, apply_overrides, load_config, load_file

# Short flags: aliases of config keys.
SHORT_FLAGS = {"data": "data.dir", "out": "run.out", "device": "run.device", "steps": "run.steps"}


def parse_config(argv: list[str]) -> Config:
    """The resolved config of this command line; prints help or the config and exits when asked."""
    parser = argparse.ArgumentParser(prog="train/main.py", add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--print-config", action="store_true")
    for flag in SHORT_FLAGS:
        parser.add_argument(f"--{flag}", default=None)
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(help_text(args.preset))
        raise SystemExit(0)
    if args.preset and args.config:
        raise ConfigError(f"--preset {args.preset} and --config {args.config}: pass one of them as the base")
    overrides += [
        f"--{key}={getattr(args, flag)}"
        for flag, key in SHORT_FLAGS.items()
        if getattr(args, flag) is not None
    ]
    resume = args.resume
    if resume == "auto":
        resume = _newest_checkpoint(_fresh(args, overrides))
    cfg = _resumed(resume, args, overrides, auto=args.resume == "auto") if resume else _fresh(args, overrides)
    check_model(cfg)  # an impossible model is refused here, before any data or process group exists
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg


def _fresh(args: argparse.Namespace, overrides: list[str]) -> Config:
    if args.config:
        return apply_overrides(load_file(args.config), overrides)
    return load_config(args.preset or "demo", overrides)


def _newest_checkpoint(cfg: Config) -> str:
    """`--resume auto`: the newest readable checkpoint of the run folder, or "" (a new run) when
    there is none yet, so one command serves the first start and every requeue."""
    run_dir = Path(cfg.run.out or f"runs/{cfg.preset}")
    found = checkpoint.newest(run_dir)
    if found is None:
        if os.environ.get("RANK", "0") == "0":
            print(f"--resume auto: no checkpoint in {run_dir / 'ckpt'}; starting a new run", file=sys.stderr)
        return ""
    return str(found[0])


def _resumed(path: str, args: argparse.Namespace, overrides: list[str], auto: bool = False) -> Config:
    """The checkpoint's config as the base; the run folder is the one holding the checkpoint's ckpt/
    folder unless --out is given.
    With --resume auto, --config names the run's first base and is not an error (one requeue command)."""
    if args.config and not auto:
        raise ConfigError(
            f"--config {args.config} and --resume {path}: a resumed run keeps its checkpoint's "
            "config (override single keys instead)"
        )
    state = checkpoint.read(path)
    cfg = from_dict(state["config"], where=f"--resume {path}")
    if args.preset and args.preset != cfg.preset:
        raise ConfigError(f"--preset {args.preset} does not match the checkpoint's preset {cfg.preset}")
    cfg.run.steps = 0  # the saved stop step does not carry over; pass --steps again to stop early
    # The run goes on in the folder that holds RUN/ckpt/FILE (a copied or moved run is its own), not
    # in the one recorded inside, where it was written and which may be another run's now.
    held = Path(path).resolve().parent
    cfg.run.out = str(held.parent) if held.name == "ckpt" else ""
    cfg.run.resume = str(path)
    cfg = apply_overrides(cfg, overrides)
    if not cfg.run.out:
        raise ConfigError(
            f"--resume {path} is not inside a run folder's ckpt/; pass --out DIR for the folder the "
            "continued run writes to"
        )
    return cfg


# --- help generated from the dataclass tree --------------------------------------------------------


def _comments(cls: type) -> dict[str, str]:
    """{field: its description} from the class source: the comments inside the field's statement (on
    its line, or inside a default that the formatter wrapped over several lines), else the block of
    comment lines right above it. Wherever the formatter puts the comment, the field keeps it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): help still lists types and defaults
        return {}
    comment = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        inside = [comment[n] for n in range(node.lineno, node.end_lineno + 1) if n in comment]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comment[n])
            n -= 1
        text = " ".join(inside or above)
        if text:
            out[node.target.id] = text
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp)).upper()


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def fields_help(obj: Any, prefix: str = "") -> list[str]:
    """One line per leaf field, `--section.field=TYPE  default  comment`, sections in tree order."""
    lines, sections = [], []
    types, comments = typing.get_type_hints(type(obj)), _comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        elif prefix:  # Config's own `preset` is the --preset flag
            flag = f"--{prefix}{f.name}={_type_name(types[f.name])}"
            lines.append(f"    {flag:<40} {_value(value):<18} {comments.get(f.name, '')}".rstrip())
    out = [f"  {prefix.rstrip('.')}:", *lines] if lines else []
    for name, section in sections:
        out += fields_help(section, f"{prefix}{name}.")
    return out


def help_text(preset: str | None = None) -> str:
    """What --help prints: usage, the flags, every config field (with the dataclass defaults, or the
    values of `preset` when one is given), every preset."""
    base = load_config(preset) if preset else Config()
    shown = f"the values of preset {preset}" if preset else "the dataclass defaults; a preset changes some"
    presets = [
        f"  {name:<16} {(inspect.getdoc(fn) or '(no docstring)').splitlines()[0]}"
        for name, fn in PRESETS.items()
    ]
    flags = [
        "  --preset NAME             base config: a named preset (default demo; listed below)",
        "  --config FILE             base config: a JSON/YAML file (--print-config output or a run's config.json)",
        "  --resume PATH|auto        continue a run from its checkpoint (its config is the base; auto = the",
        "                            newest valid checkpoint in the run folder, or a new run if there is none)",
        "  --print-config            print the resolved config as JSON and exit",
        *(f"  --{flag} VALUE{'':<{18 - len(flag)}}same as --{key}" for flag, key in SHORT_FLAGS.items()),
        "  -h, --help                this text",
    ]
    usage = __doc__.split("\n\n")[1].rstrip()  # the module docstring's command synopsis
    return "\n".join(
        [
            "usage:",
            usage,
            "",
            "flags:",
            *flags,
            "",
            f"config fields (--section.field=VALUE or --section.field VALUE; tuples comma-separated; {shown}):",
            *fields_help(base),
            "",
            "presets:",
            *presets,
            "",
            (
                "exit codes: 0 done, 1 the run failed (e.g. a non-finite loss), 2 a usage or data error, "
                "75 preempted (SIGTERM/SIGUSR1: checkpoint written, resume with --resume auto)"
            ),
        ]
    )
