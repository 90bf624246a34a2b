"""`train/main.py --help` documents every config field: the description is read from the field's
comment wherever the formatter leaves it (its line, inside a wrapped default, or the lines above)."""

from __future__ import annotations

import dataclasses
import re

from train.cli import _comments, help_text
from train.config import Config


def leaves(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{f.name}.")
        elif prefix:  # Config's own `preset` is the --preset flag
            out.append(f"{prefix}{f.name}")
    return out


def test_every_field_prints_with_a_description():
    lines = {
        m.group(1): m.group(2)
        for m in (re.match(r"\s+--([\w.]+)=\S+\s+\S+\s*(.*)$", line) for line in help_text().splitlines())
        if m
    }
    fields = leaves(Config())
    assert len(fields) > 100
    assert set(fields) <= set(lines), sorted(set(fields) - set(lines))
    undocumented = [name for name in fields if not lines[name].strip()]
    assert not undocumented, f"fields printed without a description: {undocumented}"


@dataclasses.dataclass
class _Placed:
    same_line: int = 1  # on its line
    # above it,
    # over two lines
    above: int = 2
    wrapped: tuple[int, int] = (
        1,
        2,
    )  # after a default the formatter wrapped
    inside: float = 0.5  # inside the wrapped default

    blank_above: int = 3


def test_descriptions_are_read_wherever_the_formatter_puts_them():
    assert _comments(_Placed) == {
        "same_line": "on its line",
        "above": "above it, over two lines",
        "wrapped": "after a default the formatter wrapped",
        "inside": "inside the wrapped default",
    }
