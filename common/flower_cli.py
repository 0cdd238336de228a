"""Flower's command-line programs, run as child processes of fedmri's commands.

``fedmri server start`` and ``fedmri client start`` each wrap one long-lived
Flower process (``flower-superlink``, ``flower-supernode``); ``fedmri run``,
``status`` and the server's site registration call the ``flwr`` CLI. This
module owns what they share: finding Flower's executables, checking a port,
calling ``flwr ... --format json``, and running a daemon child so that it
behaves like the command itself — its output is echoed line by line (and
watched for known failures), SIGINT/SIGTERM/SIGHUP are forwarded to it, and
the wrapper exits when it exits. The child also receives SIGTERM if the
wrapper dies without a chance to forward anything.

Going through the CLIs rather than Flower's Python internals keeps fedmri on
Flower's documented surface, and the commands can be repeated by hand.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from fedmri.errors import FedmriError, InputError

# Flower sends usage events to telemetry.flower.ai unless this is "0": from every SuperLink,
# SuperNode, ClientApp and `flwr` call, each with the host's platform, CPU count and a persistent
# id (flwr/supercore/telemetry.py). fedmri turns it off in every process it starts; a site or
# coordinator who wants to send it sets it to "1" themselves.
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"
# After a forwarded signal the child gets this long to stop before SIGKILL.
STOP_GRACE_S = 15.0
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def flower_executable(name: str) -> str:
    """Path of a Flower command (``flower-superlink``, ``flwr``...), preferring this interpreter's."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"`{name}` was not found next to {sys.executable} nor on PATH; "
                         "install fedmri with its Flower dependency (`pip install -e .`)")
    return found


def telemetry_off(env: MutableMapping[str, str]) -> None:
    """Turn Flower's telemetry off in ``env`` (:data:`TELEMETRY_ENV`), unless it is set there already.

    A hospital's network should see its SuperNode talk to the SuperLink and nothing else.
    Flower reads the variable when it is imported: set it before that, or in a child's environment.
    """
    env.setdefault(TELEMETRY_ENV, "0")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process' environment with Flower's commands first on PATH, and Flower's telemetry off.

    Flower starts helpers (``flower-superexec``, ``flwr-serverapp``) by name,
    so the folder of the running interpreter must be on PATH for them. They,
    and the ClientApps a SuperNode starts, inherit the environment.
    """
    env = dict(os.environ)
    telemetry_off(env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def flwr_json(args: Sequence[str], flwr_home: str | Path | None, *, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer.

    Args:
        args: The ``flwr`` arguments, e.g. ``["ls", "fedmri"]``.
        flwr_home: ``FLWR_HOME`` for the call (the folder holding ``config.toml``);
            None keeps the caller's.
        timeout: Seconds before the call is abandoned.

    Raises:
        FedmriError: ``flwr`` failed, timed out or said ``success: false``; the
            message carries Flower's own reason.
    """
    extra = {"FLWR_HOME": str(flwr_home)} if flwr_home is not None else {}
    command = [flower_executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(command, env=child_env(extra), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FedmriError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s; "
                          "is the SuperLink running and reachable?") from None
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise FedmriError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                          f"{detail[-1] if detail else 'no output'}")
    if not answer.get("success", False):
        reason = " ".join(str(answer.get("error-message", "no reason given")).split())
        raise FedmriError(f"`flwr {' '.join(args)}` failed: {reason}")
    return answer


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`InputError` if something already listens on ``host:port``."""
    if not 0 < port < 65536:
        raise InputError(f"port {port} is not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves do
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}; another process "
                             "(an earlier server?) holds the port: stop it or pick another with --port") from None


def wait_for_port(host: str, port: int, alive: Callable[[], bool], timeout: float) -> bool:
    """Wait until a TCP connect to ``host:port`` succeeds; False if ``alive()`` turns False or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _death_signal_setter() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel send SIGTERM to the child when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before fork, only called after
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


def _spawn(command: Sequence[str], env: Mapping[str, str], cwd: str | Path | None) -> subprocess.Popen[str]:
    """Start a daemon child in its own process group, output piped line by line; SIGTERM if this process dies."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace", process_group=0,
                            preexec_fn=_death_signal_setter())


def _echo(proc: subprocess.Popen[str], watch: Callable[[str], None] | None = None) -> None:
    """Copy the child's output to this process's stdout as it comes, each line also to ``watch``."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if watch is not None:
            watch(line)


class ForegroundChild:
    """One child process run as if it were this command.

    Args:
        command: The argv to run.
        env: Its environment.
        cwd: Its working folder.
        watch: Called with every output line (after it is echoed), e.g. to spot failures.
    """

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], cwd: str | Path | None = None,
                 watch: Callable[[str], None] | None = None) -> None:
        self.command = list(command)
        self._env = {**env, "PYTHONUNBUFFERED": "1"}  # its lines reach the watcher as they are written
        self._cwd = cwd
        self._watch = watch
        self._signalled: int | None = None
        self._signalled_at = 0.0
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the child in its own process group and forward signals to that group."""
        self.proc = _spawn(self.command, self._env, self._cwd)
        for sig in _FORWARDED:
            signal.signal(sig, self._forward)
        self._reader = threading.Thread(target=_echo, args=(self.proc, self._watch), daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def signalled(self) -> bool:
        """Whether the user asked this command to stop (so the child's exit is expected)."""
        return self._signalled is not None

    def _forward(self, signum: int, _frame: object) -> None:
        first = self._signalled is None
        self._signalled = signum
        if first:
            self._signalled_at = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signum if first else signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the child to stop as a user would (used when the wrapper gives up on it)."""
        self._forward(sig, None)

    def wait(self) -> int:
        """Wait for the child to exit; returns its exit code (128 + N if signal N killed it)."""
        assert self.proc is not None
        while True:
            try:
                code = self.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self._signalled and time.monotonic() - self._signalled_at > STOP_GRACE_S:
                    try:  # a forwarded signal was ignored: stop waiting for it
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        return 128 - code if code < 0 else code


class SupervisedChild:
    """A helper process kept alive beside a daemon: restarted when it exits, within a budget.

    ``fedmri server start`` runs Flower's ServerApp launcher (``flower-superexec``)
    this way: the SuperLink does not restart a launcher that died, and without one
    every submitted run is accepted and never starts.

    Args:
        command: The argv to run.
        env: Its environment.
        name: How messages name it.
        max_restarts: Restarts allowed within ``window_s``; one more means give up.
        window_s: The window of the restart budget, in seconds.
        say: Where restart messages go.
    """

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], name: str, cwd: str | Path | None = None,
                 max_restarts: int = 5, window_s: float = 600.0,
                 say: Callable[[str], None] = print) -> None:
        self.command, self.name = list(command), name
        self._env = {**env, "PYTHONUNBUFFERED": "1"}
        self._cwd = cwd
        self.max_restarts, self.window_s, self._say = max_restarts, window_s, say
        self.restarts: list[float] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start it in its own process group, its output echoed; it gets SIGTERM if this process dies."""
        self.proc = _spawn(self.command, self._env, self._cwd)
        threading.Thread(target=_echo, args=(self.proc,), daemon=True).start()

    def check(self) -> bool:
        """Restart it if it has exited; False when it exited once too often (the caller gives up)."""
        if self.proc is None or self.proc.poll() is None:
            return True
        code = self.proc.returncode
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if len(self.restarts) >= self.max_restarts:
            self._say(f"error: {self.name} exited (code {code}) {len(self.restarts) + 1} times within "
                      f"{self.window_s:.0f} s; giving up")
            return False
        self.restarts.append(now)
        self._say(f"{self.name} exited (code {code}); restarting it "
                  f"({len(self.restarts)} of {self.max_restarts} restarts allowed in {self.window_s:.0f} s)")
        self.start()
        return True

    def stop(self) -> None:
        """SIGTERM to its group; SIGKILL after the grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
