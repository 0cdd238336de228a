"""Run one measurement in a fresh process and take back what it reports, for the benchmarks.

A measurement of memory or threads needs its own process (its own peak RSS,
no thread pool or import left over from the one before). The child runs
``target(*args, queue)`` and puts one result on the queue; the parent waits
for it and reports a child that died instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from queue import Empty
from typing import Any


def run_in_process(target: Callable[..., None], *args: Any, start_method: str = "spawn", what: str = "",
                   on_start: Callable[[int], None] | None = None) -> Any:
    """``target(*args, queue)`` in a new process; the first thing it puts on ``queue``.

    Args:
        target: A module-level function (``spawn`` pickles it by name).
        args: Its arguments before the queue.
        start_method: ``spawn`` for a clean interpreter; ``fork`` to inherit what the
            parent imported (and nothing it ran, if it ran no torch op).
        what: How an error names the measurement; default the target's name.
        on_start: Called with the child's pid once it runs (e.g. to sample its process tree).

    Raises:
        RuntimeError: The child ended without a result, with its exit code.
    """
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        if on_start is not None:
            on_start(proc.pid)
        while True:
            try:
                result = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{what or target.__name__} died with exit code {proc.exitcode}") from None
        proc.join()
        return result
    finally:
        if proc.is_alive():  # interrupted: end the measurement
            proc.terminate()
            proc.join(10)
