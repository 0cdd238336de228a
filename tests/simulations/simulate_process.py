"""`fedmri simulate` in a child process that leaves nothing running (not a test module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def run_simulate(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``fedmri simulate *args`` in its own session; fail if any of its processes outlive it."""
    proc = subprocess.Popen([sys.executable, "-m", "fedmri.cli", "simulate", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        # Ray's daemons (GCS, raylet, dashboard) take some seconds to exit after
        # the driver: give them 30 s, then count what is left.
        deadline = time.monotonic() + 30
        while (leftovers := _session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in leftovers:  # Ray's helpers, should the engine not stop them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftovers, f"processes left running after simulate: {leftovers}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
