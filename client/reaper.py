"""Stopping the ClientApp processes of runs that have ended (the site daemon runs it beside the SuperNode)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# SuperNode output naming the run of the message that follows, a message being received,
# and a run that is no longer running (flwr 1.42's start_client_internal).
_RUN_HEADER = re.compile(r"\[RUN (\d+)")
_RECEIVING = re.compile(r"Receiving: \S+ message")
_RUN_ENDED = re.compile(r"Run ID (\d+) is not in `RUNNING` status")
_CLIENTAPP = "flwr-clientapp"
_SIGTERM_BIT = 1 << (signal.SIGTERM - 1)  # in /proc/PID/status SigCgt: the process handles SIGTERM


def _processes() -> dict[int, tuple[int, int]]:
    """Process id -> (parent id, start time) of every live process; empty where there is no /proc."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it has just exited
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(root: int, table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found.update(kids)
        todo.extend(kids)
    return found


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _catches_sigterm(pid: int) -> bool:
    match = re.search(r"SigCgt:\s*([0-9a-f]+)", _proc_text(pid, "status"))
    return match is not None and bool(int(match.group(1), 16) & _SIGTERM_BIT)


@dataclass
class _ClientApp:
    run: int | None  # the run of the message the SuperNode last received when it appeared
    stopped_at: float | None = None  # when it was sent SIGTERM


class ClientAppReaper:
    """Stops the ClientApp processes of runs that have ended.

    flwr 1.42's SuperNode handles one message at a time: it receives the message,
    creates a task for it and pulls the message's content from the SuperLink, while
    its launcher (``flower-superexec``) already starts a ``flwr-clientapp`` process
    for the task. If the run ends meanwhile (its ServerApp died or was stopped), the
    SuperLink refuses the rest of the content; the SuperNode logs ``Run ID N is not
    in `RUNNING` status. Ignoring message ...`` and goes on with other work, but
    neither ends the task nor tells the ClientApp, which waits for that content
    (500 tries per object, back-off up to 10 s: over an hour). Flower has no setting
    for it, and the SuperNode asks the SuperLink about a run only when it moves a
    message of that run.

    That log line is where a site learns that a run ended, so the reaper reads the
    SuperNode's output. A ClientApp belongs to the run of the last message received
    before the process appeared (one message at a time). Once the SuperNode says a
    run is not running, each ClientApp of that run gets SIGTERM as soon as Flower's
    handler for it is installed (the handler marks the task failed, so it is not
    started again) and SIGKILL ``grace_s`` later if still alive. Linux only (/proc);
    elsewhere it does nothing.

    Args:
        grace_s: Seconds between SIGTERM and SIGKILL.
        say: Where to report each ClientApp stopped.
    """

    def __init__(self, grace_s: float = 10.0, say: Callable[[str], None] = print) -> None:
        self.grace_s, self._say = grace_s, say
        self._lock = threading.Lock()
        self._header: int | None = None  # the run named by the SuperNode's last "[RUN N" line
        self._receiving: int | None = None  # the run of the last message received
        self.ended: set[int] = set()
        self._apps: dict[tuple[int, int], _ClientApp] = {}  # (pid, start time) -> what is known of it

    def line(self, text: str) -> None:
        """Read one line of the SuperNode's output."""
        with self._lock:
            if (match := _RUN_HEADER.search(text)) is not None:
                self._header = int(match.group(1))
            elif _RECEIVING.search(text):
                self._receiving = self._header
            elif (match := _RUN_ENDED.search(text)) is not None:
                self.ended.add(int(match.group(1)))

    def sweep(self, root: int) -> None:
        """Note new ClientApps below ``root`` (the SuperNode) and stop those of runs that ended."""
        table = _processes()
        alive = {(pid, table[pid][1]) for pid in _descendants(root, table)
                 if _CLIENTAPP in _proc_text(pid, "cmdline")}
        now = time.monotonic()
        with self._lock:
            self._apps = {key: self._apps.get(key) or _ClientApp(self._receiving) for key in alive}
            stale = [(pid, app) for (pid, _), app in self._apps.items() if app.run in self.ended]
        for pid, app in stale:
            if app.stopped_at is None and _catches_sigterm(pid):
                app.stopped_at = now
                _kill(pid, signal.SIGTERM)
                self._say(f"stopping the ClientApp (process {pid}) of run {app.run}, which has ended")
            elif app.stopped_at is not None and now - app.stopped_at > self.grace_s:
                _kill(pid, signal.SIGKILL)

    def watch(self, root: int, alive: Callable[[], bool], every_s: float = 1.0) -> None:
        """Sweep every ``every_s`` seconds while ``alive()``."""
        while alive():
            self.sweep(root)
            time.sleep(every_s)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
