"""`torch.distributed` as the official losses call it, made callable without a process group.

The official DINO and iBOT losses call `dist.all_reduce` and `dist.get_world_size()` unconditionally
(their scripts always initialise a group). The transcriptions import this module as `dist` instead:
with a process group it is torch.distributed itself; without one, all_reduce does nothing and the
world has one rank, which is what those calls mean on a single process.
"""

from __future__ import annotations

import torch.distributed as _dist


def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def get_world_size() -> int:
    return _dist.get_world_size() if is_initialized() else 1


def all_reduce(tensor, *args, **kwargs):
    if is_initialized():
        return _dist.all_reduce(tensor, *args, **kwargs)
    return None
