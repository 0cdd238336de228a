"""Timestamps of a round's steps across processes: where does a deployed round's time go?

Off unless ``FEDMRI_TRACE`` names a file. Every process of a deployment on one
machine (ServerApp, ClientApps) then appends one JSON line per event to that file:
wall-clock time, process id, event name and a few numbers (round, node, bytes).
``benchmarks/bench_deploy_base.py --trace`` turns the lines into a breakdown of a
round: pushing the messages, the sites' ClientApps starting, their handlers, and
the replies coming back. Nothing patient-related is written: stage names, rounds,
node ids, byte counts and times only.
"""

from __future__ import annotations

import json
import os
import time

TRACE_ENV = "FEDMRI_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def event(name: str, **fields: str | int | float) -> None:
    """Append ``name`` with the current time and ``fields`` to the trace file, if one is set."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    row = {"t": time.time(), "pid": os.getpid(), "event": name, **fields}
    # One short line per write with O_APPEND: lines from several processes do not interleave.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def process_started() -> float:
    """Wall-clock time this process started (Linux ``/proc``); the current time elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
