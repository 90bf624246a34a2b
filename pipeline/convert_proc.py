"""The converter's process control: the exclusive lock on --out, Ctrl-C, and the worker pool.

with lock_out(out):              # a second converter into out exits at once naming the holder
    with worker_pool(4) as pool:  # workers ignore Ctrl-C; the parent alone handles it
        ...
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from pipeline.discover import LOCK
from pipeline.errors import ConvertError
from pipeline.folder_lock import hold


@contextmanager
def sigint_held_back():
    """Hold Ctrl-C back while pool workers are forked or terminated, and raise it afterwards.
    Python raises KeyboardInterrupt at whatever line runs when the signal comes; inside
    multiprocessing's fork hooks or terminate() it is swallowed ("Exception ignored", and the
    run goes on) or leaves their locks held; inside tqdm's constructor (before 4.70) it leaves a
    half-built bar whose __del__ prints a traceback."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield  # signals go to the main thread only; and a caller's own handler is left alone
        return
    came = []
    signal.signal(signal.SIGINT, lambda *_: came.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if came:
        raise KeyboardInterrupt


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def worker_pool(workers: int):
    """A pool whose workers ignore Ctrl-C: the parent alone handles it and terminates them. A worker
    that died of KeyboardInterrupt printed a traceback, and one that died holding the task queue's
    lock made the parent's terminate() wait forever."""
    # fork: the workers need nothing but this module and the plan, and start instantly
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with sigint_held_back():
        pool = ctx.Pool(workers, initializer=_ignore_sigint)
    try:
        yield pool
    finally:
        with sigint_held_back():
            pool.terminate()


def lock_out(out: Path):
    """Hold an exclusive lock on out for the whole conversion (pipeline/folder_lock.py): two
    converters into one folder delete each other's unfinished shards and leave a dataset.json that
    fails --verify."""
    return hold(
        out,
        LOCK,
        lambda holder: ConvertError(
            f"{out} is being written by another converter ({holder}); "
            "wait for it to finish or choose another --out"
        ),
    )
