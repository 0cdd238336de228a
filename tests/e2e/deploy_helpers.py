"""Helpers for the e2e tests: real processes on localhost, started by fedmri's own commands
and always stopped by process id.

Every daemon runs in a process group of its own, with its output in a file.
Stopping one sends SIGTERM to its group (the fedmri command forwards it to its
Flower child), waits, then SIGKILLs the group and any process of its tree
still alive (Flower starts helpers such as ``flower-superexec`` in sessions of
their own), matching each process id with its start time so that a reused id
is never hit. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FEDMRI = [sys.executable, "-c", "from fedmri.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """Process id -> start time of ``root`` and all its live descendants."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            parents.setdefault(info[0], []).append(int(entry))
            starts[int(entry)] = info[1]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
        todo.extend(parents.get(pid, []))
    return tree


def fedmri_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One short-lived fedmri command; the timeout bounds it."""
    return subprocess.run([*FEDMRI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


class Daemon:
    """A long-lived fedmri command (``server start``, ``client start``) in its own process group."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen([*FEDMRI, *args], stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tree: dict[int, int] = {}

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the output matches ``pattern``; fail with the output if it does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (match := re.search(pattern, self.output)) is not None:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        if (match := re.search(pattern, self.output)) is not None:
            return match
        raise AssertionError(f"no {pattern!r} within {timeout} s (exit {self.proc.poll()}):\n{self.output[-4000:]}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None

    def remember_tree(self) -> None:
        self.tree.update(process_tree(self.proc.pid))

    def signal(self, sig: int) -> None:
        self.remember_tree()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def terminate(self) -> None:
        """Send SIGTERM to the daemon's process group (as Ctrl-C or a service manager would)."""
        self.remember_tree()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the group, wait, then SIGKILL the group and every survivor of its tree."""
        self.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        for pid, started in self.tree.items():
            while (info := _stat(pid)) is not None and info[1] == started:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)
        self.proc.wait(timeout=10)
        self._out.close()

    def survivors(self) -> list[int]:
        """Processes of the recorded tree that are still alive."""
        return [pid for pid, started in self.tree.items() if (info := _stat(pid)) and info[1] == started]


def write_site(folder: Path, name: str, address: str, ca: Path, key: Path, port: int) -> Path:
    """A site.yaml whose catalog is an empty folder: enough for the SuperNode and the ClientApp to start."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalog").mkdir(exist_ok=True)
    site = folder / "site.yaml"
    site.write_text(f"name: {name}\ncatalog: catalog\nserver:\n  address: {address}\n"
                    f"  root_certificates: {ca}\n  node_key: {key}\n  clientappio_port: {port}\n")
    return site


def stop_all(daemons: list[Daemon]) -> None:
    """Stop daemons together: SIGTERM to every group first, then wait for each."""
    for daemon in daemons:
        daemon.terminate()
    for daemon in reversed(daemons):
        daemon.stop()
