"""Which loader runs: data.loader (`auto` | `dali` | `reference`) against what is installed. One owner
for the choice, imported by the package's `build_loader` and by the DALI loader itself."""

from __future__ import annotations

import warnings

LOADERS = ("auto", "dali", "reference")
DALI_INSTALL = "pip install 'eqrecon[dali]'"


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (it is an optional extra: `pip install 'eqrecon[dali]'`)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_loader(name: str, rank: int = 0) -> str:
    """data.loader -> the loader that runs: `auto` is DALI when it imports, else the reference loader
    with one warning (on rank 0); `dali` without DALI is a ConfigError naming the install command."""
    from pipeline.errors import ConfigError

    if name not in LOADERS:
        raise ConfigError(f"unknown data.loader {name!r}; choose from {', '.join(LOADERS)}")
    if name == "reference" or dali_available():
        return "reference" if name == "reference" else "dali"
    if name == "dali":
        raise ConfigError(
            f"data.loader=dali needs NVIDIA DALI, which does not import here: {DALI_INSTALL} "
            "(or use --data.loader=reference)"
        )
    if rank == 0:
        warnings.warn(
            f"NVIDIA DALI is not installed: data.loader=auto uses the PyTorch reference loader "
            f"(slower; {DALI_INSTALL} for the DALI pipeline)",
            stacklevel=3,
        )
    return "reference"
