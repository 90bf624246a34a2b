"""The one error hierarchy of eqrecon: mistakes a user can fix, shown as one `error:` line.

Every command-line entry point (`train/main.py`, `pipeline.convert`, `train/export.py`,
`train/probe.py`, the benches) catches `UserError` only and prints `error: <message>`; any other
exception is a bug and keeps its traceback. The classes live here, at the bottom of the import
graph (nothing in this module imports the rest of eqrecon), so any module can raise them without
an import cycle.

    UserError
    ├── ConfigError      bad preset, key or value; impossible sizes
    ├── DataError        missing or unreadable data folder, dataset.json, source images
    │   └── ShardError   a shard or its DALI index that is missing, truncated or corrupt
    ├── ConvertError     the converter cannot proceed (output folder, lock, disk)
    ├── CheckpointError  a --resume file that is missing, truncated, foreign or of another architecture
    ├── ExportError      an export that cannot be read or written
    ├── ProbeError       a probe that cannot run on what it was given
    └── TrainingError    a run that cannot go on (a non-finite loss)
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is shown as is, on one line."""

    exit_code = 2


class ConfigError(UserError):
    """A bad preset name, config key or value."""


class DataError(UserError):
    """Missing or unreadable data: the data folder, dataset.json, a source image."""


class ShardError(DataError):
    """A shard or its index that is missing, truncated or corrupt."""


class ConvertError(UserError):
    """The converter cannot proceed (output folder, lock, disk space)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, not eqrecon's, or of another architecture."""


class ExportError(UserError):
    """An exported backbone that cannot be read or written."""


class ProbeError(UserError):
    """A probe that cannot run on the backbone or data it was given."""


class TrainingError(UserError):
    """A run that cannot go on, e.g. a non-finite loss."""

    exit_code = 1


def one_line(err: BaseException) -> str:
    """`error: <message>` with the message's whitespace folded onto one line."""
    return "error: " + " ".join(str(err).split())
