"""Worker processes for ``fedmri data index``: files and series are read on every core, the catalog by one.

The indexer hands the pool pure work (read a file's header; load, preprocess
and cache a series) and gets plain results back in the order it handed the
work over, so catalog rows, the skip list and cache entries are the same for
any number of workers. SQLite is touched only by the indexer's own process,
inside its one transaction: a killed run still changes nothing.

Workers come from a ``forkserver`` that has imported the indexer once (no
``fork`` of a process that may hold threads: rich's progress bar, torch's
pool), so a pool starts in about the time of one import, and later pools of
the same process at once. Each worker runs torch on one thread (N workers
for N cores), ignores Ctrl-C (the indexer handles it and rolls back) and exits
when the process that started it dies, so ``kill -9`` leaves no orphans.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from fedmri.errors import ConfigError, FedmriError

T = TypeVar("T")

# Default cap: past a handful of processes the disk, not the CPU, sets the pace, and every
# worker holds a volume of clinical size (and its resampled copies) in memory.
MAX_DEFAULT_WORKERS = 8
# What the forkserver imports once, so workers start without importing torch and MONAI each.
_PRELOAD = ["fedmri.data.indexer"]


def default_workers() -> int:
    """CPUs this process may run on (its affinity mask: what a container or ``taskset`` grants), at most 8."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        usable = os.cpu_count() or 1
    return max(1, min(usable, MAX_DEFAULT_WORKERS))


class IndexPool:
    """Ordered ``map`` over worker processes, started on first use; in this process when ``workers`` is 1.

    Args:
        workers: processes to use; 1 runs everything in the calling process; 0 =
            :func:`default_workers`, but only for work big enough to pay for
            starting them (see :meth:`map`).

    Raises:
        ConfigError: ``workers`` is negative.
    """

    def __init__(self, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers={workers!r} must be an integer >= 0 (0 = one per CPU core, "
                              "1 = no worker processes)")
        self.auto = workers == 0
        self.workers = default_workers() if self.auto else workers
        self._executor: ProcessPoolExecutor | None = None
        self._alive: tuple[Connection, Connection] | None = None  # workers exit on EOF of the read end

    def map(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]], chunksize: int = 1,
            auto_min: int = 0) -> Iterator[T]:
        """``fn(*a)`` for each ``a`` in ``args``, results in that order; ``fn`` must be a module-level function.

        Args:
            fn: the work; it and its arguments and results are pickled.
            args: argument tuples.
            chunksize: items sent to a worker at once (cheap items: more).
            auto_min: with ``workers=0``, fewer items than this run in this process
                unless the workers already run: starting them (one import of torch
                and MONAI, a few seconds) would cost more than it saves.

        Raises:
            FedmriError: a worker process died (most often: out of memory).
        """
        small = self.auto and self._executor is None and len(args) < auto_min
        if self.workers == 1 or len(args) < 2 or small:
            return (fn(*a) for a in args)
        if self._executor is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)  # no effect once this process' forkserver runs
            self._alive = ctx.Pipe(duplex=False)
            self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(self._alive[0],))
        return self._results(self._executor.map(fn, *zip(*args, strict=True), chunksize=chunksize))

    def _results(self, results: Iterator[T]) -> Iterator[T]:
        try:
            yield from results
        except BrokenProcessPool as exc:
            raise FedmriError(f"an index worker process died ({exc}); most often the machine ran out of memory: "
                              f"run again with fewer --workers than {self.workers}. The catalog is unchanged "
                              "and the series already preprocessed are kept") from None

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (for the test hook); empty when none were started."""
        return sorted(p.pid for p in mp.active_children() if p.pid is not None) if self._executor else []

    def close(self) -> None:
        """Stop the workers: queued work is dropped, work in hand (one item per worker) is finished."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._alive is not None:
            for end in self._alive:
                end.close()
            self._alive = None

    def __enter__(self) -> IndexPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_worker(alive: Connection) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_indexer, args=(alive,), daemon=True, name="exit-with-indexer").start()


def _exit_with_indexer(alive: Connection) -> None:
    # The indexer holds the only write end: EOF when it closes the pool or dies, even by SIGKILL. (The
    # forkserver, this process' parent, does not help: it lives as long as any process it forked.)
    try:
        alive.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)
