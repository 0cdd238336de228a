"""A deployed federation on localhost: `fedmri server start`, `fedmri client start`, `fedmri run`, `fedmri status`.

TLS and SuperNode authentication are on, as in production. One SuperLink
serves the whole module. Four site daemons start together with it: two
registered sites, one whose key was never registered and one that trusts the
wrong CA; the tests then look at what became of each. The last test stops the
server with SIGTERM. Every process is stopped by the fixtures, pass or fail.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import Daemon, fedmri_cli, free_port, process_tree, stop_all, write_site

from fedmri.certs import init_authority, issue_site_key

GOOD = ("site-01", "site-02")


@dataclass
class Federation:
    certs: Path
    state: Path
    address: str
    port: int
    sites: dict[str, Path]
    server: Daemon
    clients: dict[str, Daemon]
    other_ca: Path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    certs = root / "certs"
    init_authority(certs, ["localhost", "127.0.0.1"], list(GOOD))
    # Same CA, a key the coordinator never registered: kept out of the certs folder.
    rogue = root / "rogue-certs"
    rogue.mkdir()
    shutil.copy(certs / "ca.crt", rogue / "ca.crt")
    rogue_key, _ = issue_site_key(rogue, "site-99")
    other_ca = init_authority(root / "other-ca", ["localhost"], []).folder / "ca.crt"

    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[Daemon] = []
    try:
        server = Daemon(["server", "start", "--certs", str(certs), "--state", str(root / "state"),
                         "--host", "127.0.0.1", "--port", str(port)], root / "server.log")
        started.append(server)
        server.wait_for(r"SuperLink ready at https://127\.0\.0\.1:\d+: .*2 site key\(s\) registered", 90)
        sites = {name: write_site(root / name, name, address, certs / "ca.crt", certs / f"{name}.key", free_port())
                 for name in GOOD}
        sites["unregistered"] = write_site(root / "site-99", "site-99", address, rogue / "ca.crt", rogue_key,
                                           free_port())
        sites["wrong-ca"] = write_site(root / "wrong-ca", "site-01", address, other_ca, certs / "site-01.key",
                                       free_port())
        clients = {}
        for name, site in sites.items():
            clients[name] = Daemon(["client", "start", "--site", str(site)], root / f"{name}.log")
            started.append(clients[name])
        for name in GOOD:
            clients[name].wait_for(r"connected to the SuperLink at .* as node \d+", 60)
        yield Federation(certs, root / "state", address, port, sites, server, clients, other_ca)
    finally:
        stop_all(started)


def _status(fed: Federation) -> dict:
    out = fedmri_cli("status", "--state", str(fed.state), "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_unregistered_site_key_is_refused(federation: Federation) -> None:
    client = federation.clients["unregistered"]
    assert client.wait_exit(60) == 2
    assert "refused this site's key" in client.output and "site-99.pub" in client.output
    assert "connected to the SuperLink" not in client.output


def test_wrong_ca_cannot_connect(federation: Federation) -> None:
    client = federation.clients["wrong-ca"]
    assert client.wait_exit(60) == 2
    assert "TLS to the SuperLink" in client.output and str(federation.other_ca) in client.output
    assert "connected to the SuperLink" not in client.output


def test_second_server_on_a_busy_port_says_so(federation: Federation, tmp_path: Path) -> None:
    out = fedmri_cli("server", "start", "--insecure", "--state", str(tmp_path / "state"),
                     "--host", "127.0.0.1", "--port", str(federation.port), timeout=60)
    assert out.returncode == 2
    assert "WARNING: --insecure" in out.stdout  # said before anything else happens
    assert f"127.0.0.1:{federation.port}" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_run_completes_over_tls_with_node_auth(federation: Federation, tmp_path: Path) -> None:
    config = tmp_path / "federation.yaml"
    config.write_text("name: e2e\nmin_sites: 2\nstages:\n  - {name: evaluate}\n")
    out = fedmri_cli("run", "--config", str(config), "--state", str(federation.state), "--stream", timeout=240)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    run_id = out.stdout.split("run ", 1)[1].split()[0]
    assert f"run {run_id}: finished:completed" in out.stdout

    status = _status(federation)
    # The two registered sites, named and online; no node for the refused ones.
    assert sorted((s["site"], s["status"]) for s in status["sites"]) == [("site-01", "online"), ("site-02", "online")]
    run = next(r for r in status["runs"] if r["run_id"] == run_id)
    assert run["status"] == "finished:completed" and run["name"] == "e2e"
    assert run["run_dir"] == str(federation.state.resolve() / "runs" / "e2e")
    assert Path(run["run_dir"]).is_dir()  # the ServerApp works in the state folder
    assert json.loads((federation.state / "submissions" / f"{run_id}.json").read_text())["name"] == "e2e"
    # Each ClientApp found its site file through the SuperNode's node config: it
    # opened the (empty) catalog that site.yaml names, and said so in the site's log.
    for name in GOOD:
        assert str(federation.sites[name].parent / "catalog") in federation.clients[name].output


def test_server_stops_with_its_child_on_sigterm(federation: Federation) -> None:
    server = federation.server
    assert [pid for pid in process_tree(server.proc.pid) if pid != server.proc.pid], "no SuperLink child"
    server.signal(signal.SIGTERM)  # to the fedmri process only: it must forward it
    assert server.wait_exit(30) == 0
    assert "SuperLink stopped" in server.output
    deadline = time.monotonic() + 10  # Flower's helpers notice their parent is gone within ~0.2 s
    while server.survivors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.survivors() == []
