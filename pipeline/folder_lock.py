"""One writer per output folder: the converter's --out and the trainer's run folder.

    with hold(folder, ".convert.lock", lambda holder: ConvertError(f"... ({holder}) ...")):
        ...   # a second process into folder gets refused(holder) at once

An exclusive, non-blocking flock on a lock file inside the folder, which names the holder (pid, host,
start time). The kernel drops the lock when the holder exits, kill -9 included, so a stale file never
blocks. The file stays when the holder is done: removing it would let a third process lock a new file
while a second one still holds the old.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError


@contextmanager
def hold(folder: Path, name: str, refused: Callable[[str], UserError], wait: bool = False) -> Iterator[None]:
    """Hold folder/name exclusively while the block runs; raise refused(holder) if another process
    holds it (holder: "pid P on HOST, started TIME", as that process wrote it), or with wait=True
    wait until it lets go."""
    with open(os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise refused(f.read().strip() or "a process that is starting") from None
        f.truncate(0)
        f.write(
            f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        )
        f.flush()
        yield
