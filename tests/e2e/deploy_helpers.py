"""Helpers for the e2e tests: real processes on localhost, started by fedmri's own commands
and always stopped by process id.

Every daemon runs in a process group of its own, with its output in a file.
Stopping one sends SIGTERM to its group (the fedmri command forwards it to its
Flower child), waits, then SIGKILLs the group and any process of its tree
still alive (Flower starts helpers such as ``flower-superexec`` in sessions of
their own, and ``flower-supernode`` in a process group of its own), matching
each process id with its start time so that a reused id is never hit. Every
wait is bounded.

Every process seen in a daemon's tree is also kept in :data:`RECORDED`, so that
the e2e conftest can check at the end of the session that none is left.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

FEDMRI = [sys.executable, "-c", "from fedmri.cli import main; main()"]
# Process id -> start time of every process seen in a daemon's tree (or a short command's group).
RECORDED: dict[int, int] = {}


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


def _alive(pid: int, started: int) -> bool:
    return (info := _stat(pid)) is not None and info[1] == started


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def leftovers() -> dict[int, str]:
    """Recorded processes still alive (same id, same start time): pid -> command line."""
    return {pid: cmdline(pid) for pid, started in RECORDED.items() if _alive(pid, started)}


Snapshot = tuple[dict[int, list[int]], dict[int, int]]


def snapshot() -> Snapshot:
    """Children of each process and start time of each live process, read once from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            children.setdefault(info[0], []).append(int(entry))
            starts[int(entry)] = info[1]
    return children, starts


def process_tree(root: int, snap: Snapshot | None = None) -> dict[int, int]:
    """Process id -> start time of ``root`` and all its live descendants."""
    children, starts = snap or snapshot()
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return tree


def fedmri_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One short-lived fedmri command; the timeout bounds it.

    It runs in a process group of its own, so that on a timeout the ``flwr``
    command it may be waiting on is killed with it, not left behind.
    """
    with subprocess.Popen([*FEDMRI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          stdin=subprocess.DEVNULL, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            RECORDED.update(process_tree(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=10)
            raise AssertionError(f"fedmri {' '.join(args)} still running after {timeout} s:\n"
                                 f"{stdout[-2000:]}\n{stderr[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class Daemon:
    """A long-lived fedmri command (``server start``, ``client start``) in its own process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen([*FEDMRI, *args], stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self.tree: dict[int, int] = {}

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, poll: float = 0.2) -> re.Match[str]:
        """Wait until the output matches ``pattern`` (looked at every ``poll`` s); fail with the output
        if it does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_tree()
            if (match := re.search(pattern, self.output)) is not None:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(poll)
        if (match := re.search(pattern, self.output)) is not None:
            return match
        raise AssertionError(f"no {pattern!r} within {timeout} s (exit {self.proc.poll()}):\n{self.output[-4000:]}")

    def wait_exit(self, timeout: float, watch: Iterable[Daemon] = ()) -> int:
        """Wait for the exit code; meanwhile record the trees of ``watch`` (the processes a run starts)."""
        watch = list(watch)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            snap = snapshot()
            for daemon in (self, *watch):
                daemon.remember_tree(snap)
            time.sleep(1.0)
        if self.proc.poll() is None:
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}")
        return self.proc.returncode

    def remember_tree(self, snap: Snapshot | None = None) -> None:
        # Only while the daemon is our unreaped child: its id cannot have been reused then.
        if self.proc.poll() is None:
            self.tree.update(process_tree(self.proc.pid, snap))
            RECORDED.update(self.tree)

    def kill_tree(self, timeout: float = 10.0) -> dict[int, str]:
        """SIGKILL the daemon and every process of its tree, as a crash or a power cut would.

        The tree is frozen first (SIGSTOP), and read again until no new process
        appears, so that a child being spawned meanwhile (a ClientApp starting)
        is not missed; then every frozen process is killed.

        Returns:
            Process id -> command line of each process killed.
        """
        frozen: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            new = {pid: started for pid, started in process_tree(self.proc.pid).items() if pid not in frozen}
            if not new:
                break
            for pid, started in new.items():
                if _alive(pid, started):
                    os.kill(pid, signal.SIGSTOP)
            frozen.update(new)
        names = {pid: cmdline(pid) for pid in frozen}
        self.tree.update(frozen)
        RECORDED.update(frozen)
        for pid, started in frozen.items():
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.survivors(), {pid: cmdline(pid) for pid in self.survivors()}
        return names

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
            while _alive(pid, started):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)
        self.proc.wait(timeout=10)
        self._out.close()

    def survivors(self) -> list[int]:
        """Processes of the recorded tree that are still alive."""
        return [pid for pid, started in self.tree.items() if _alive(pid, started)]


def write_site(folder: Path, name: str, address: str, ca: Path, key: Path, port: int,
               catalog: Path | None = None) -> Path:
    """A site.yaml for a SuperNode on this machine.

    Without ``catalog`` it names an empty folder: enough for the SuperNode and
    the ClientApp to start, not to train. With one (an indexed catalog) the
    site trains on one thread with batch 2, as the ``federation_sites`` files do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if catalog is None:
        (folder / "catalog").mkdir(exist_ok=True)
    site = folder / "site.yaml"
    data = "catalog: catalog\n" if catalog is None else f"catalog: {catalog}\nthreads: 1\nbatch_size: 2\n"
    site.write_text(f"name: {name}\n{data}server:\n  address: {address}\n"
                    f"  root_certificates: {ca}\n  node_key: {key}\n  clientappio_port: {port}\n")
    return site


def stop_all(daemons: list[Daemon]) -> None:
    """Stop daemons together: SIGTERM to every group first, then wait for each."""
    for daemon in daemons:
        daemon.terminate()
    for daemon in reversed(daemons):
        daemon.stop()


def processes_named(root: int, text: str) -> dict[int, str]:
    """Process id -> command line of each process in ``root``'s tree whose command line holds ``text``."""
    return {pid: line for pid in process_tree(root) if text in (line := cmdline(pid))}


def wait_for_process(site: Daemon, text: str, timeout: float, before: set[int] = frozenset()) -> int:
    """The newest process in ``site``'s tree whose command line holds ``text`` and that is not in ``before``.

    Polls every 0.1 s and fails after ``timeout`` seconds with the end of the site's output.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        site.remember_tree()
        if new := set(processes_named(site.proc.pid, text)) - set(before):
            return max(new)
        time.sleep(0.1)
    raise AssertionError(f"no new {text} process at {site.log.stem} within {timeout} s:\n{site.output[-3000:]}")


def hold_clientapps(site: Daemon) -> int:
    """Freeze (SIGSTOP) a site daemon's warm ClientApp starter; returns its pid.

    The site's next ClientApp launcher then waits, alive, for a fork that does not come, until
    the test kills the site (or sends SIGCONT). Forked warm, with the trainers imported, a
    micro-encoder ClientApp answers in about a second: a test that must catch a site in the
    middle of a message, after its previous reply went out, holds the site between the two.
    Only the starter is frozen (the daemon's direct child), not a ClientApp it forked that is
    still on its way out.
    """
    children, _ = snapshot()
    starters = [pid for pid in children.get(site.proc.pid, []) if "fedmri.client.warm" in cmdline(pid)]
    assert len(starters) == 1, f"{len(starters)} warm starters under {site.log.stem}'s daemon"
    os.kill(starters[0], signal.SIGSTOP)
    return starters[0]


def clientapp_worker(site: Daemon, launcher: int, timeout: float = 30) -> int:
    """The process that does the work of the ClientApp whose ``flwr-clientapp`` launcher is ``launcher``.

    A site daemon's warm starter (fedmri.client.warm) forks it: its newest child born no
    earlier than the launcher (a site runs one message at a time). Without a starter the
    launcher does the work itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot()
        born = snap[1].get(launcher)
        starters = [pid for pid in process_tree(site.proc.pid, snap) if "fedmri.client.warm" in cmdline(pid)]
        if born is None or not starters:
            return launcher
        kids = [(snap[1][kid], kid) for kid in snap[0].get(starters[0], []) if snap[1].get(kid, -1) >= born]
        if kids:
            return max(kids)[1]
        assert time.monotonic() < deadline, f"no ClientApp forked for launcher {launcher} within {timeout} s"
        time.sleep(0.05)


class Relay:
    """A TCP relay on localhost in front of a server: a site's network link that a test can stall.

    The site connects to :attr:`address` instead of the server; bytes pass unchanged,
    so TLS and node authentication stay end to end (the server certificate names
    127.0.0.1). :meth:`hold` keeps, on each connection, what the site sends (``up``) or
    what the server answers (``down``) in the relay instead of passing it on, as a
    congested link would, from the first piece of at least ``at_least`` bytes on; the
    smaller pieces before it pass. :meth:`let_go` passes on, in order, what was kept, and
    then closes what either end closed meanwhile.

    How long a hold lasts before it breaks the exchange (flwr 1.42, uvicorn): the server
    closes a connection 5 s after its last answer if no request came (keep-alive), so a
    request held ``up`` is lost after at most 5 s; an answer held ``down`` keeps the
    connection open for 30 s (the site's read timeout, and the server's wait for the TLS
    close that the relay holds too).
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._target = (host, port)
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._at_least = {"up": 0, "down": 0}  # 0: the direction passes
        # Per direction: (connection, destination socket, bytes kept for it, or None for "then close
        # both sockets") in arrival order; and the connections whose pieces are being kept.
        self._kept: dict[str, list[tuple[int, socket.socket, bytes | None]]] = {"up": [], "down": []}
        self._keeping: dict[str, set[int]] = {"up": set(), "down": set()}
        self._ends: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.kept_bytes = {"up": 0, "down": 0}  # kept since the direction was last held
        self._sockets: list[socket.socket] = [self._listener]
        # What passed, for a failing test to show: (seconds since the relay started, event).
        self._t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, direction: str, at_least: int = 1) -> None:
        """Keep what passes in ``direction`` on each connection, from its first piece of at least
        ``at_least`` bytes on."""
        with self._lock:
            if not self._at_least[direction]:
                self.kept_bytes[direction] = 0
            self._at_least[direction] = at_least
            self._event(f"{direction} held from the first piece of {at_least} bytes or more")

    def let_go(self, direction: str) -> None:
        """Pass on, in order, what ``direction`` kept, and let it pass from now on."""
        with self._lock:
            self._event(f"{direction} let go ({len(self._kept[direction])} pieces kept)")
            for number, dst, data in self._kept[direction]:
                try:
                    if data is None:
                        self._shut(*self._ends[number])
                    else:
                        dst.sendall(data)
                except OSError:
                    pass  # that connection is gone
            self._kept[direction].clear()
            self._keeping[direction].clear()
            self._at_least[direction] = 0

    def _event(self, text: str) -> None:
        self.events.append((round(time.monotonic() - self._t0, 2), text))

    def mark(self, text: str) -> None:
        """Note a step of the test among the relay's events."""
        with self._lock:
            self._event(f"-- {text}")

    def describe(self, lines: int = 300) -> str:
        """The relay's events, one per line, for a failure message: from 5 s before a direction was
        first held (or the start), at most ``lines`` of them."""
        with self._lock:
            held = [t for t, text in self.events if " held from " in text]
            since = held[0] - 5 if held else 0.0
            shown = [f"{t:8.2f} s  {text}" for t, text in self.events if t >= since]
        return "\n".join(shown[:lines] + ([f"... {len(shown) - lines} more"] if len(shown) > lines else []))

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                site, _ = self._listener.accept()
                server = socket.create_connection(self._target)
            except OSError:
                return
            with self._lock:
                self._sockets += [site, server]
                self._connections += 1
                number = self._connections
                self._ends[number] = (site, server)
                self._event(f"connection {number} opened")
            threading.Thread(target=self._pump, args=(site, server, "up", number), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, site, "down", number), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, number: int) -> None:
        end = "site" if direction == "up" else "server"
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                keeping = number in self._keeping[direction]
                if not data:
                    if keeping:  # closed after what is kept: close once that has passed
                        self._kept[direction].append((number, dst, None))
                        self._event(f"connection {number} closed by the {end}, after what is kept")
                    else:
                        self._event(f"connection {number} closed by the {end}")
                        self._shut(src, dst)
                    return
                at_least = self._at_least[direction]
                if keeping or (at_least and len(data) >= at_least):
                    self._keeping[direction].add(number)
                    self._kept[direction].append((number, dst, data))
                    self.kept_bytes[direction] += len(data)
                    self._event(f"connection {number}: {len(data)} bytes {direction} kept")
                    continue
                self._event(f"connection {number}: {len(data)} bytes {direction}")
                try:
                    dst.sendall(data)
                except OSError:
                    return
