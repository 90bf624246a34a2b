"""Test-only pytest plugin (`-p block_dali`): makes `import nvidia.dali` fail as on a machine without
DALI, for the subprocess in test_optional_dali.py."""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder


class BlockDali(MetaPathFinder):
    """Refuses nvidia.dali and its submodules; every other import is left to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError(f"No module named {name!r} (blocked by tests/pipeline/block_dali.py)")
        return None  # noqa: RET501, PLR1711  (the finder protocol: None = "not mine, ask the next finder")


assert "nvidia.dali" not in sys.modules, "the blocker must be installed before anything imports DALI"
sys.meta_path.insert(0, BlockDali())
