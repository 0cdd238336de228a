"""The coordinator's server daemon: a Flower SuperLink with TLS and SuperNode authentication.

``fedmri server start`` runs ``flower-superlink`` in the foreground with the
certificates from ``fedmri certs init``, keeps its state in one folder, writes
the Flower CLI's connection entry for it (so ``flwr`` and ``fedmri run`` /
``status`` reach it without hand-editing ``config.toml``) and registers every
site public key in the certs folder once the SuperLink answers.

It also starts Flower's ServerApp launcher (``flower-superexec``, which starts a
ServerApp process for each submitted run) and supervises it: the SuperLink runs
with ``--isolation process``, so it starts none of its own, and a launcher that
dies is restarted (up to 5 times in 10 minutes; then the server stops with an
error, exit 3). A SuperLink left without a launcher would accept every run and
start none.

State folder layout::

    STATE/state.db         with --store disk only: the SuperLink's database (runs, nodes,
                           registered keys, message payloads until delivered)
    STATE/flwr/config.toml Flower CLI connections ([superlink.<federation>]); FLWR_HOME
    STATE/flwr/apps/       app bundles the SuperLink installed
    STATE/sites.json       node id -> site name, for the keys registered from here
    STATE/runs/<name>/     run folders: the SuperLink works in STATE, so a federation
                           config's relative run_root (``runs``) lands here
    STATE/submissions/     what `fedmri run` submitted: <run id>.yaml and .json

In flwr 1.42 the SuperLink serves its Fleet, Control and ServerAppIo APIs
over HTTP(S) on one port (``--host``/``--port``, Flower's default 8000); fedmri
uses 9092, the port a ``site.yaml`` points at by default.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedmri.certs import CA_CERT, SERVER_CERT, SERVER_KEY, server_names, site_public_keys
from fedmri.errors import FedmriError, InputError
from fedmri.flower_cli import (
    ForegroundChild,
    SupervisedChild,
    check_port_free,
    child_env,
    flower_executable,
    flwr_json,
    wait_for_port,
)

DEFAULT_PORT = 9092
STORES = ("disk", "memory")
# flwr's name for its Python in-memory LinkState and ObjectStore (flwr.supercore.constant).
IN_MEMORY_STORE = ":flwr-in-memory:"
DEFAULT_FEDERATION = "fedmri"
SITES_FILE = "sites.json"
# How long the SuperLink may take to open its port (imports dominate: ~3 s here).
START_TIMEOUT_S = 60.0
# How often `server start` checks that the SuperLink and its ServerApp launcher are alive.
SUPERVISE_EVERY_S = 1.0


@dataclass
class ServerSettings:
    """What ``fedmri server start`` was asked for."""

    # Folder for the SuperLink's database, Flower CLI config and run outputs.
    state: Path
    # Folder from `fedmri certs init`: ca.crt, server.crt, server.key, <site>.pub.
    certs: Path | None = None
    # Interface to listen on; 0.0.0.0 for all.
    host: str = "0.0.0.0"
    # The one port of the Fleet, Control and ServerAppIo APIs.
    port: int = DEFAULT_PORT
    # Name of the connection written to STATE/flwr/config.toml (`flwr ... NAME`).
    federation: str = DEFAULT_FEDERATION
    # Plain HTTP without TLS or node authentication: local tests only.
    insecure: bool = False
    # Where the SuperLink keeps its state and message payloads: "memory" (Flower's
    # in-memory store; runs and node registrations are gone after a restart, and
    # fedmri registers the certs folder's keys again at start) or "disk" (SQLite in
    # STATE/state.db, whose 5 s lock wait large payloads can exceed: docs/deployment.md).
    store: str = "memory"


def flwr_home(state: str | Path) -> Path:
    """The ``FLWR_HOME`` folder that ``server start`` writes under a state folder."""
    return Path(state).expanduser().resolve() / "flwr"


def runs_folder(state: str | Path) -> Path:
    """Where run folders land by default: the SuperLink (and so the ServerApp) works in STATE,
    and a federation config's relative ``run_root: runs`` resolves there."""
    return Path(state).expanduser().resolve() / "runs"


def connect_host(host: str) -> str:
    """The address at which this machine reaches a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_certs(settings: ServerSettings) -> dict[str, Path]:
    """The CA, certificate and key the SuperLink needs, checked to exist and to name this host.

    Raises:
        InputError: A file is missing, or the certificate does not name the
            address the SuperLink (and the local ``flwr`` CLI) reaches it at.
    """
    if settings.certs is None:
        raise InputError("give --certs DIR (made by `fedmri certs init`), or --insecure for a local test")
    folder = settings.certs.expanduser().resolve()
    files = {"ca": folder / CA_CERT, "cert": folder / SERVER_CERT, "key": folder / SERVER_KEY}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}; make them with "
                         f"`fedmri certs init --out {folder} --san HOST --site NAME ...`")
    host = connect_host(settings.host)
    names = server_names(files["cert"])
    if host not in names:
        raise InputError(f"{files['cert']} names {', '.join(names) or 'no host'} but the SuperLink is reached "
                         f"at {host}; reissue it with `fedmri certs init --san {host} ... --force`")
    return files


def superlink_command(settings: ServerSettings) -> list[str]:
    """The ``flower-superlink`` argv for these settings (after the certificates were checked)."""
    state = settings.state.expanduser().resolve()
    command = [flower_executable("flower-superlink"),
               "--host", settings.host, "--port", str(settings.port),
               "--database", str(state / "state.db") if settings.store == "disk" else IN_MEMORY_STORE,
               "--disable-runtime-dependency-installation",
               # fedmri starts and supervises the ServerApp launcher itself (launcher_command).
               "--isolation", "process"]
    if settings.insecure:
        return [*command, "--insecure"]
    assert settings.certs is not None  # check_certs ran
    certs = settings.certs.expanduser().resolve()
    return [*command,
            "--ssl-ca-certfile", str(certs / CA_CERT),
            "--ssl-certfile", str(certs / SERVER_CERT),
            "--ssl-keyfile", str(certs / SERVER_KEY),
            "--enable-supernode-auth"]


def launcher_command(settings: ServerSettings, superlink_pid: int) -> list[str]:
    """The ``flower-superexec`` argv: Flower's ServerApp launcher, attached to the SuperLink's runtime API.

    The SuperLink runs with ``--isolation process``, so it starts no launcher of its
    own; ``serve`` starts this one, restarts it if it dies, and it exits with the
    SuperLink (``--parent-pid``).
    """
    address = _address(connect_host(settings.host), settings.port)
    command = [flower_executable("flower-superexec"), "--runtime-api-address", address,
               "--parent-pid", str(superlink_pid)]
    if settings.insecure:
        return [*command, "--insecure"]
    assert settings.certs is not None  # check_certs ran
    return [*command, "--root-certificates", str(settings.certs.expanduser().resolve() / CA_CERT)]


def write_connection(home: Path, federation: str, address: str, root_certificates: Path | None) -> Path:
    """Add or replace ``[superlink.<federation>]`` in ``home/config.toml`` and make it the default.

    Other connections in the file are kept. ``root_certificates`` None writes
    ``insecure = true``.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    try:
        doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML ({exc}); fix or delete it") from None
    links = doc.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates)
    links[federation] = entry
    links["default"] = federation
    path.write_text(tomli_w.dumps(doc))
    return path


def read_connection(home: Path, federation: str | None) -> tuple[str, dict[str, object]]:
    """The name and entry of a connection in ``home/config.toml`` (the default one if None).

    Raises:
        InputError: No such file or connection, with what to run.
    """
    path = home / "config.toml"
    if not path.is_file():
        raise InputError(f"{path} does not exist; start the server with `fedmri server start --state "
                         f"{home.parent}` first, or pass the --state it was started with")
    doc = tomllib.loads(path.read_text())
    links = doc.get("superlink", {})
    name = federation or links.get("default")
    if not name or not isinstance(links.get(name), dict):
        known = sorted(k for k, v in links.items() if isinstance(v, dict))
        raise InputError(f"federation {name!r} is not in {path}; known: {', '.join(known) or 'none'}")
    return name, links[name]


def register_site(state: Path, federation: str, public_key: Path) -> tuple[str, str | None]:
    """Register one site's public key with the SuperLink of a state folder (``flwr supernode register``).

    The node id is remembered in ``STATE/sites.json`` so that ``fedmri status`` can name sites.

    Returns:
        A line for the coordinator, and the node id (None if the key was already registered).

    Raises:
        FedmriError: Flower refused the key or the SuperLink did not answer.
    """
    site = public_key.stem
    try:
        answer = flwr_json(["supernode", "register", str(public_key), federation, "--name", site],
                           flwr_home(state))
    except FedmriError as exc:
        if "already in use" in str(exc):
            return f"site {site}: already registered", None
        raise
    node = str(answer.get("node-id"))
    _remember_node(Path(state).expanduser().resolve(), site, node)
    return f"site {site}: registered as node {node}", node


def site_nodes(state: str | Path) -> dict[str, str]:
    """Node id -> site name for the keys this state folder registered (``STATE/sites.json``)."""
    path = Path(state).expanduser().resolve() / SITES_FILE
    try:
        nodes = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in nodes.items()} if isinstance(nodes, dict) else {}


def _remember_node(state: Path, site: str, node: str) -> None:
    nodes = site_nodes(state)
    nodes[node] = site
    (state / SITES_FILE).write_text(json.dumps(nodes, indent=2, sort_keys=True) + "\n")


def serve(settings: ServerSettings) -> int:
    """Run the SuperLink in the foreground until it exits or is told to stop.

    Returns:
        The exit code for the ``fedmri server start`` process.
    """
    state = settings.state.expanduser().resolve()
    if settings.store not in STORES:
        raise InputError(f"--store {settings.store!r} is not one of {', '.join(STORES)}")
    if settings.insecure:
        _say("WARNING: --insecure: plain HTTP without TLS and without SuperNode authentication; "
             "anyone who reaches the port can join and read the traffic. Use only for local tests.")
        root = None
        sites: dict[str, Path] = {}
    else:
        root = check_certs(settings)["ca"]
        sites = site_public_keys(root.parent)
        if not sites:
            _say(f"note: {settings.certs} holds no <site>.pub; no site can connect until one is "
                 "issued (`fedmri certs add-site`) and registered (`fedmri server register`)")
    check_port_free(settings.host, settings.port)
    state.mkdir(parents=True, exist_ok=True)
    home = flwr_home(state)
    host = connect_host(settings.host)
    config = write_connection(home, settings.federation, _address(host, settings.port), root)

    child = ForegroundChild(superlink_command(settings), env=child_env({"FLWR_HOME": str(home)}),
                            cwd=state)
    child.start()
    if not wait_for_port(host, settings.port, lambda: child.alive and not child.signalled, START_TIMEOUT_S):
        if child.signalled:  # stopped by the user while starting
            child.wait()
            return 0
        if child.alive:
            _say(f"error: the SuperLink did not open {host}:{settings.port} within {START_TIMEOUT_S:.0f} s")
            child.stop()
        return child.wait() or 1
    try:
        for public_key in sites.values():
            _say(register_site(state, settings.federation, public_key)[0])
    except FedmriError as exc:
        if child.signalled:  # the user stopped the server while keys were being registered
            child.wait()
            return 0
        _say(f"error: {exc}")
        child.stop()
        child.wait()
        return 2
    launcher = SupervisedChild(launcher_command(settings, child.proc.pid), env=child_env({"FLWR_HOME": str(home)}),
                               cwd=state, name="the ServerApp launcher (flower-superexec)", say=_say)
    launcher.start()
    scheme = "http" if settings.insecure else "https"
    _say(f"SuperLink ready at {scheme}://{_address(settings.host, settings.port)}: federation "
         f"'{settings.federation}' ({config}), {len(sites)} site key(s) registered, state in {state}. "
         "Ctrl-C stops it.")
    try:
        while child.alive:
            time.sleep(SUPERVISE_EVERY_S)
            if child.alive and not child.signalled and not launcher.check():
                _say("error: without a launcher no run can start; stopping the SuperLink. Its log above has "
                     "the launcher's last lines; start the server again")
                child.stop()
                child.wait()
                return 3
        code = child.wait()
    finally:
        launcher.stop()
    _say(f"SuperLink stopped (exit {code})")
    return 0 if child.signalled and code in (0, 130, 143) else code


def _say(line: str) -> None:
    print(f"fedmri: {line}", flush=True)
    sys.stdout.flush()
