"""Fresh processes for the benchmarks: one measurement each, or another checkout of fedmri.

A measurement of memory or threads needs its own process (its own peak RSS,
no thread pool or import left over from the one before). The child runs
``target(*args, queue)`` and puts one result on the queue; the parent waits
for it and reports a child that died instead of hanging.

To compare a change with its base in the same run, a benchmark starts processes
that import another checkout's fedmri with this venv's libraries
(:func:`boot_folder`, :func:`tree_env`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) that process ``pid`` has used so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# Imported first by every Python process started with its folder on PYTHONPATH: with FEDMRI_TREE set,
# the installed editable finder maps the fedmri packages to that tree's folders.
SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    _tree = os.environ.get("FEDMRI_TREE")
    if _tree:
        for _name, _mod in list(sys.modules.items()):
            if _name.startswith("__editable___fedmri"):
                _home = _mod.MAPPING["fedmri"].rsplit("/", 1)[0]
                for _k, _v in list(_mod.MAPPING.items()):
                    _mod.MAPPING[_k] = _tree + _v[len(_home):]
                for _k, _v in list(_mod.NAMESPACES.items()):
                    _mod.NAMESPACES[_k] = [_tree + p[len(_home):] for p in _v]
""")


def boot_folder(root: Path) -> Path:
    """A folder holding the ``sitecustomize`` that :func:`tree_env` puts on PYTHONPATH."""
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return boot


def tree_env(tree: str, boot: Path) -> dict[str, str]:
    """Environment entries that make a child process (and every process it starts) import ``tree``'s fedmri."""
    return {"PYTHONPATH": str(boot), "FEDMRI_TREE": tree}
