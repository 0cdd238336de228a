"""The site's client daemon: a Flower SuperNode that trains next to the site's data.

``fedmri client start --site site.yaml`` checks the site file and everything
it names before anything connects, then runs ``flower-supernode`` in the
foreground: TLS to the coordinator's SuperLink with the coordinator's CA, the
site's node key for authentication, and the absolute path of ``site.yaml`` in
the node config (``site-config``), where the ClientApp reads it. Paths sent by
the server are never trusted.

Each ClientApp process starts through fedmri's launcher, which refuses an app
bundle that brings code of its own (:mod:`fedmri.client.guard`); a warm starter
beside the SuperNode, started once the SuperNode has connected, has imported fedmri
and the stage trainers once and forks it (:mod:`fedmri.client.warm`), so a message
no longer waits seconds for imports.

When the SuperNode fails for a reason a site admin can fix (the SuperLink's
certificate is not signed by the given CA; the coordinator has not registered
this site's key), the daemon ends with one line that says so. A refused key is
tried again for :data:`ACTIVATION_PATIENCE_S` first: the SuperLink refuses a
restarted site the same way until its previous SuperNode's heartbeat lapses. While it runs, it
stops the ClientApp processes of runs that have ended
(:class:`~fedmri.client.reaper.ClientAppReaper`).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from fedmri.client.guard import write_launcher
from fedmri.client.reaper import ClientAppReaper
from fedmri.client.site import load_site
from fedmri.client.warm import socket_path
from fedmri.errors import FedmriError, InputError
from fedmri.flower_cli import ForegroundChild, child_env, flower_executable

# SuperNode output that names a cause the site admin can act on.
_TLS_FAILURE = re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error|WRONG_VERSION_NUMBER")
_AUTH_FAILURE = re.compile(r"\[code: 2004\]|Failed to activate SuperNode")
_CONNECTED = re.compile(r"SuperNode ID:\s*(\d+)")
# The SuperLink counts a node online until its last heartbeat + 2 x its 30 s interval (flwr
# 1.42's HEARTBEAT_PATIENCE), and a stopped SuperNode does not sign off: so a restart keeps
# trying to activate for this long before it calls the key unregistered.
ACTIVATION_PATIENCE_S = 75.0
ACTIVATION_RETRY_S = 10.0


@dataclass
class SupernodeLaunch:
    """A checked site: the argv, environment and folder to run its SuperNode with."""

    site: DictConfig
    site_file: Path
    command: list[str]
    flwr_home: Path
    insecure: bool
    warnings: list[str] = field(default_factory=list)


def _node_config_value(path: Path) -> str:
    text = str(path)
    if '"' not in text and "\\" not in text:
        return f'site-config="{text}"'
    if "'" not in text:
        return f"site-config='{text}'"
    raise InputError(f"the site file path {text} holds both quote kinds; move site.yaml to a plainer path")


def _check_address(address: str, site_file: Path) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"site file {site_file}: server.address {address!r} must be HOST:PORT, "
                         "e.g. coordinator.example.org:9092 (ask the coordinator)")


def prepare(site_file: str | Path, *, insecure: bool = False, state: str | Path | None = None) -> SupernodeLaunch:
    """Check a site file and everything it names; build the SuperNode's command.

    Args:
        site_file: The site admin's ``site.yaml``.
        insecure: Connect without TLS and node authentication even if the site
            file does not say ``server.insecure: true`` (local tests only).
        state: The SuperNode's Flower home (installed app bundles);
            default ``.flwr`` next to the site file.

    Raises:
        InputError: A missing file or folder, or a setting that cannot work,
            naming the file and what to do.
        ConfigError: The site file itself is invalid.
    """
    site = load_site(site_file)
    path = Path(site_file).expanduser().resolve()
    server = site.server
    insecure = bool(insecure or server.insecure)
    warnings: list[str] = []
    _check_address(server.address, path)
    catalog = Path(site.catalog)
    if not catalog.is_dir():
        raise InputError(f"site file {path}: catalog {catalog} does not exist; index the site's data with "
                         f"`fedmri data index DICOM_DIR --reports reports.csv --out {catalog}`")
    if not (catalog / "catalog.sqlite").is_file():
        warnings.append(f"catalog {catalog} holds no catalog.sqlite yet; training rounds will fail until "
                        "`fedmri data index ... --out` fills it")
    command = [flower_executable("flower-supernode"), "--superlink", server.address,
               "--node-config", _node_config_value(path)]
    if server.clientappio_port:
        command += ["--port", str(server.clientappio_port)]
    if insecure:
        warnings.append("WARNING: insecure: no TLS and no node authentication; the site's updates travel "
                        "in clear text. Use only for local tests.")
        command.append("--insecure")
    else:
        for key, what in (("root_certificates", "the coordinator's ca.crt"),
                          ("node_key", f"this site's private key ({site.name}.key from `fedmri certs`)")):
            value = server[key]
            if value is None:
                raise InputError(f"site file {path}: server.{key} is not set; point it at {what} "
                                 "(or set server.insecure: true for a local test)")
            if not Path(value).is_file():
                raise InputError(f"site file {path}: server.{key} {value} does not exist; "
                                 f"copy {what} there or fix the path")
        key_mode = stat.S_IMODE(Path(server.node_key).stat().st_mode)
        if key_mode & 0o077:
            warnings.append(f"WARNING: {server.node_key} is readable by others (mode {key_mode:o}); "
                            f"run `chmod 600 {server.node_key}`")
        command += ["--root-certificates", server.root_certificates,
                    "--auth-supernode-private-key", server.node_key]
    home = Path(state).expanduser().resolve() if state is not None else path.parent / ".flwr"
    return SupernodeLaunch(site, path, command, home, insecure, warnings)


class _Watcher:
    """Reads the SuperNode's output for failures a site admin can fix, and passes it to the reaper."""

    def __init__(self, launch: SupernodeLaunch, reaper: ClientAppReaper,
                 on_connect: Callable[[], None] = lambda: None) -> None:
        self.launch = launch
        self.reaper = reaper
        self.on_connect = on_connect
        self.cause: str | None = None
        self.refused = False  # the SuperLink would not activate this site's node

    def __call__(self, line: str) -> None:
        self.reaper.line(line)
        server = self.launch.site.server
        if (match := _CONNECTED.search(line)) is not None:
            _say(f"site {self.launch.site.name} connected to the SuperLink at {server.address} "
                 f"as node {match.group(1)}; waiting for work")
            self.on_connect()
        elif self.cause is None and _TLS_FAILURE.search(line):
            self.cause = (f"TLS to the SuperLink at {server.address} failed: its certificate is not signed by "
                          f"{server.root_certificates} (or does not name that host); get the federation's "
                          "ca.crt from the coordinator and check server.address")
        elif self.cause is None and _AUTH_FAILURE.search(line):
            self.refused = True
            self.cause = (f"the SuperLink at {server.address} refused this site's key {server.node_key}: "
                          f"ask the coordinator to register {Path(server.node_key or '').stem}.pub "
                          "(`fedmri server register`), or check that the key is the one they issued; "
                          "if a SuperNode with this key runs elsewhere, stop it")


def serve(launch: SupernodeLaunch) -> int:
    """Run the SuperNode in the foreground until it exits or is told to stop.

    Returns:
        The exit code for ``fedmri client start``.

    Raises:
        FedmriError: The SuperNode stopped for a reason the site admin can fix.
    """
    for warning in launch.warnings:
        _say(warning)
    launch.flwr_home.mkdir(parents=True, exist_ok=True)
    reaper = ClientAppReaper(say=_say)
    env = child_env({"FLWR_HOME": str(launch.flwr_home)})
    # Flower starts each ClientApp as `flwr-clientapp` from PATH: fedmri's launcher checks the
    # coordinator's app bundle before any of it can be imported (fedmri.client.guard).
    guard = write_launcher(launch.flwr_home / "fedmri-bin").parent
    env["PATH"] = os.pathsep.join([str(guard), env["PATH"]])
    starter = _WarmStarter(socket_path(guard), env)
    try:
        return _supervise(launch, reaper, env, on_connect=starter.start)
    finally:
        starter.stop()


class _WarmStarter:
    """The warm ClientApp starter (:mod:`fedmri.client.warm`): it imports fedmri and the stage
    trainers once, then forks each ClientApp.

    Started once the SuperNode has connected, not before: a site that cannot connect (a wrong
    CA, a key not registered yet) does not spend seconds of CPU and half a gigabyte on imports
    for messages that cannot come. A message that arrives before it is ready runs cold. In its
    own session, so that a Ctrl-C meant for the SuperNode does not reach it; the daemon stops
    it, and it stops by itself once the daemon is gone.
    """

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start it, unless it runs already (a reconnecting SuperNode keeps the one it has)."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "fedmri.client.warm", str(self.path), str(os.getpid())],
                    env={**self.env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        with self._lock:
            if self.proc is None:
                return
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _supervise(launch: SupernodeLaunch, reaper: ClientAppReaper, env: dict[str, str],
               on_connect: Callable[[], None] = lambda: None) -> int:
    """Run the SuperNode until it exits or is told to stop; retry a refused activation for a while."""
    first = time.monotonic()
    while True:
        watcher = _Watcher(launch, reaper, on_connect)
        child = ForegroundChild(launch.command, env=env, cwd=launch.site_file.parent, watch=watcher)
        _say(f"starting site {launch.site.name}'s SuperNode -> {launch.site.server.address}")
        child.start()
        assert child.proc is not None
        # Bound now: a retry rebinds `child`, and this thread must end with its own SuperNode.
        threading.Thread(target=reaper.watch, args=(child.proc.pid, lambda c=child: c.alive), daemon=True).start()
        code = child.wait()
        if child.signalled:
            _say(f"SuperNode stopped (exit {code})")
            return 0 if code in (0, 130, 143) else code
        if code != 0 and watcher.refused and time.monotonic() - first < ACTIVATION_PATIENCE_S:
            # Flower 1.42's SuperNode does not sign its node off when it stops, and the SuperLink
            # refuses to activate a node it still counts online: a restart within a minute of the
            # last stop meets the same refusal as an unregistered key. Only waiting tells them apart.
            _say(f"the SuperLink did not activate site {launch.site.name}'s node: its key is not registered, "
                 "or this site's previous SuperNode stopped less than a minute ago and the SuperLink still "
                 f"counts it online; trying again in {ACTIVATION_RETRY_S:.0f} s (for up to "
                 f"{ACTIVATION_PATIENCE_S:.0f} s)")
            deadline = time.monotonic() + ACTIVATION_RETRY_S
            while time.monotonic() < deadline and not child.signalled:
                time.sleep(0.2)
            if child.signalled:  # stopped while waiting: the signal reached the wrapper's handler
                _say("stopped before the SuperNode started")
                return 0
            continue
        if code != 0 and watcher.cause is not None:
            raise FedmriError(f"{watcher.cause} (flower-supernode exit {code})")
        return code


def _say(line: str) -> None:
    print(f"fedmri: {line}", flush=True)
    sys.stdout.flush()
