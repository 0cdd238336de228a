"""The deployed federation that the e2e test modules share: its sites, its fixture's body, reading a run.

Each module that uses it gets its own SuperLink (a module-scoped ``federation`` fixture that
yields from :func:`start_federation`), so modules run on different pytest-xdist workers at once
and one module's killed SuperNodes are not still listed online in another's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import Daemon, fedmri_cli, free_port, stop_all, write_site
from omegaconf import OmegaConf

from fedmri.certs import init_authority, issue_site_key

GOOD = ("site-01", "site-02")
# Registered with the others; their SuperNodes start in the kill tests.
SPARES = ("site-03", "site-04", "site-05")
SPARE = SPARES[0]
# The spare sites without a hospital of their own train on a copy of these sites' catalogs.
CATALOG_OF = {"site-04": "site-01", "site-05": "site-02"}
CONNECTED = r"connected to the SuperLink at .* as node \d+"
# Onto the micro preset. warmup_fraction=0: the schedule is read at the start of each
# round, so a one-round stage would otherwise train at the warm-up's lr 0.
OVERRIDES = ["ssl.warmup_fraction=0"]
# Bounds on a whole run: seconds of compute, but every message starts a ClientApp process
# (torch and fedmri imports), and the 2-core CI machine is shared.
RUN_TIMEOUT_S = 360


@dataclass
class Federation:
    certs: Path
    state: Path
    address: str
    port: int
    sites: dict[str, Path]  # site.yaml of GOOD, SPARES and the two that cannot connect
    server: Daemon
    clients: dict[str, Daemon]
    other_ca: Path


def start_federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     refused_sites: bool = False) -> Iterator[Federation]:
    """A module's federation (the body of its module-scoped ``federation`` fixture): a SuperLink with
    the GOOD and SPARES keys registered, GOOD's daemons connected, and with ``refused_sites`` two
    sites that cannot connect ("unregistered" and "wrong-ca"; the first keeps restarting its
    SuperNode for a minute, CPU that the modules which do not test them should not pay)."""
    # Sites get the indexed hospitals only when a selected test here trains (those ask for
    # federation_sites too): indexing them is half a minute the other tests do not need.
    training = any("federation_sites" in item.fixturenames for item in request.session.items
                   if getattr(item, "module", None) is request.module)
    catalogs = {name: catalog for name, _, catalog in request.getfixturevalue("federation_sites")} if training else {}
    root = tmp_path_factory.mktemp("deployed")
    for name, source in CATALOG_OF.items() if training else ():
        catalogs[name] = Path(shutil.copytree(catalogs[source], root / "catalogs" / name,
                                              ignore=shutil.ignore_patterns(".fedmri")))
    certs = root / "certs"
    init_authority(certs, ["localhost", "127.0.0.1"], [*GOOD, *SPARES])
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
        server.wait_for(r"SuperLink ready at https://127\.0\.0\.1:\d+: .*5 site key\(s\) registered", 90)
        sites = {name: write_site(root / name, name, address, certs / "ca.crt", certs / f"{name}.key", free_port(),
                                  catalogs.get(name)) for name in (*GOOD, *SPARES)}
        if refused_sites:
            sites["unregistered"] = write_site(root / "site-99", "site-99", address, rogue / "ca.crt", rogue_key,
                                               free_port())
            sites["wrong-ca"] = write_site(root / "wrong-ca", "site-01", address, other_ca, certs / "site-01.key",
                                           free_port())
        clients = {}
        for name, site in sites.items():
            if name not in SPARES:
                clients[name] = Daemon(["client", "start", "--site", str(site)], root / f"{name}.log")
                started.append(clients[name])
        for name in GOOD:
            clients[name].wait_for(CONNECTED, 60)
        yield Federation(certs, root / "state", address, port, sites, server, clients, other_ca)
    finally:
        stop_all(started)


def status(fed: Federation) -> dict:
    out = fedmri_cli("status", "--state", str(fed.state), "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start_spares(fed: Federation, daemons: list[Daemon], folder: Path) -> dict[str, Daemon]:
    """`fedmri client start` for each of SPARES, every one connected when it returns (stopped with ``daemons``)."""
    spares = {name: Daemon(["client", "start", "--site", str(fed.sites[name])], folder / f"{name}.log")
              for name in SPARES}
    daemons.extend(spares.values())
    for daemon in spares.values():
        daemon.wait_for(CONNECTED, 90)
    return spares


def start_run(fed: Federation, daemons: list[Daemon], folder: Path, name: str, stages: list[dict],
               **settings: object) -> tuple[Daemon, Path, Path]:
    """`fedmri run --stream` of a micro-encoder federation, as a daemon (stopped whatever happens).

    Returns the run daemon, the federation file and the run folder.
    """
    body = {"name": name, "preset": "micro", "overrides": OVERRIDES, "min_sites": 2, "wait_for_sites_s": 60,
            "stages": stages} | settings
    config = folder / "federation.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(body)))
    run = Daemon(["run", "--config", str(config), "--state", str(fed.state), "--stream"], folder / "run.log")
    daemons.append(run)
    return run, config, fed.state / "runs" / name  # relative run_root: under the server's state folder


def finish(fed: Federation, run: Daemon) -> str:
    """Wait for a streamed run; it must end completed. Returns its run id."""
    code = run.wait_exit(RUN_TIMEOUT_S, watch=[fed.server, *fed.clients.values()])
    assert code == 0, run.output[-6000:]
    run_id = run.output.split("run ", 1)[1].split()[0]
    assert f"run {run_id}: finished:completed" in run.output
    return run_id


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sites(rows: list[dict], server_round: int, status: str) -> set[str]:
    return {r["site"] for r in rows if r["server_round"] == server_round and r["status"] == status}


def aggregate(rows: list[dict], server_round: int) -> dict:
    return next(r for r in rows if r["server_round"] == server_round and r["site"] == "all")

