"""A deployed run whose ServerApp is killed and resumed with `fedmri run --resume`; a site that restarts
between rounds; a site that drops the work of a run that has ended.

One deployment on localhost (TLS, node authentication, a SuperLink and two sites
training the micro encoder on the synthetic hospitals of ``federation_sites``)
plays one run of two pretrain rounds: site-01 restarts between rounds 1 and 2;
once round 2 has reached the sites the ServerApp is killed (SIGKILL) and the
coordinator ends the dead run with ``flwr stop``; ``fedmri run --resume`` trains
round 2 again while the sites drop what they still hold of the dead run. The
module fixture plays it once; the tests check what it left.

Moments that are races in a real deployment are made exact here:

- site-01 restarts after its reply to round 1 reached the coordinator and before
  round 2 is sent: site-02's ClientApp is held (SIGSTOP) so that round 1 stays open
  meanwhile. (A SuperNode that stops is marked offline at once, and flwr 1.42 then
  answers every message still addressed to it with "Node Unavailable", even one it
  has already answered: the coordinator must have collected the reply first. It
  collects every 3 s; the hold lasts :data:`COLLECT_S`.)
- site-02 reaches the SuperLink through a :class:`~deploy_helpers.Relay` that holds the
  answer carrying round 2's message until the run has ended, so that its content is
  fetched just after: what a slow link does when a ServerApp dies (a ViT-B update is
  ~900 MB). The SuperNode then drops the message, but the ClientApp process Flower
  already started for it waits for that content for over an hour; `fedmri client
  start` must stop it (:class:`fedmri.client.daemon.ClientAppReaper`). The coordinator
  is paused (SIGSTOP) while site-02 answers round 1, so that round 2 cannot go out
  before the test is ready, and site-02's SuperNode is paused from then until the
  killed run's resume has been refused, so that the held answer waits only for
  ``flwr stop``, well within the site's HTTP timeout of 30 s. (An earlier version held
  site-02's request instead, which the server drops after 5 s of keep-alive: the test
  failed when the CI machine was slow.)

The uninterrupted run it is compared with runs in-process (the same ClientApp code
and site files over ``LocalGrid``): a second deployed run would cost another
minute of ClientApp start-ups on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from deploy_helpers import (Daemon, Relay, clientapp_worker, fedmri_cli, free_port, processes_named, stop_all,
                            wait_for_process, write_site)
from helpers.waiting import wait_until
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fedmri.certs import init_authority
from fedmri.flower_cli import flwr_json

pytestmark = pytest.mark.slow

SITES = ("site-01", "site-02")
NAME = "resumable"
FEDERATION = {"name": NAME, "preset": "micro", "overrides": ["ssl.warmup_fraction=0"], "min_sites": 2,
              "wait_for_sites_s": 120, "export": False,
              "stages": [{"name": "pretrain", "rounds": 2, "local_steps": 1}]}
CONNECTED = r"connected to the SuperLink at .* as node \d+"
CLIENTAPP = "flwr-clientapp"
# Seconds round 1 stays open after site-01's reply: the coordinator collects replies every 3 s.
COLLECT_S = 7.0
# Once a site's SuperNode has said that a run is no longer running, that run's ClientApp at the site
# must be gone within this many seconds (the daemon looks every second, SIGKILL 10 s after SIGTERM).
GRACE_S = 20.0
RUN_TIMEOUT_S = 300
# An answer of at least this many bytes carries work (round 2's message: 6.7 kB with the micro
# encoder); "no work", a heartbeat's answer and a TLS handshake are under 1 kB.
WORK_BYTES = 2000


@dataclass
class Played:
    """What the deployment left: the run folder, the daemons (with their logs), what was seen on the way."""

    state: Path
    run_dir: Path
    killed_run: str = ""
    refused: Any = None  # `fedmri run --resume` while the killed run was still listed as running
    resumed: Daemon | None = None
    first_site_01: Daemon | None = None
    site_01: Daemon | None = None
    site_02: Daemon | None = None
    # The ended run's ClientApp at each site if still alive GRACE_S after the site's SuperNode said the run ended.
    left: dict[str, dict[int, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _wait_count(daemon: Daemon, text: str, n: int, timeout: float) -> None:
    daemon.wait_for(rf"(?:{re.escape(text)}[\s\S]*){{{n}}}", timeout)


def _outlives_its_run(site: Daemon, pid: int, ended_line: str) -> dict[int, str]:
    """ClientApp ``pid`` if still alive GRACE_S after the site's SuperNode said that its run ended, else {}.

    One that ends before the SuperNode says so (its reply went out while the run still ran) is fine.
    """
    deadline, learnt = time.monotonic() + RUN_TIMEOUT_S, None
    while alive := {p: line for p, line in processes_named(site.proc.pid, CLIENTAPP).items() if p == pid}:
        site.remember_tree()
        if learnt is None and re.search(ended_line, site.output):
            learnt = time.monotonic()
        if learnt is not None and time.monotonic() > learnt + GRACE_S:
            return alive
        assert time.monotonic() < deadline, f"ClientApp {pid} at {site.log.stem} still runs after {RUN_TIMEOUT_S} s"
        time.sleep(0.5)
    return {}


def _wait_latest(ckpt: Path, name: str, run: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ((ckpt / "LATEST").is_file() and (ckpt / "LATEST").read_text().strip() == name):
        assert run.proc.poll() is None, f"the run ended early:\n{run.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {name} in {ckpt} within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def played(federation_sites: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Played]:
    t0 = time.monotonic()
    catalogs = {name: catalog for name, _, catalog in federation_sites}
    root = tmp_path_factory.mktemp("resume")
    certs = init_authority(root / "certs", ["localhost", "127.0.0.1"], list(SITES)).folder
    port = free_port()
    state = root / "state"
    out = Played(state, state / "runs" / NAME)
    started: list[Daemon] = []
    paused: list[int] = []  # processes stopped (SIGSTOP) by the fixture, continued on the way out
    relay = Relay(port)
    try:
        server = Daemon(["server", "start", "--certs", str(certs), "--state", str(state), "--host", "127.0.0.1",
                         "--port", str(port)], root / "server.log")
        started.append(server)
        server.wait_for(r"SuperLink ready at https://", 90)
        site_files = {name: write_site(root / name, name, relay.address if name == "site-02" else f"127.0.0.1:{port}",
                                       certs / "ca.crt", certs / f"{name}.key", free_port(), catalogs[name])
                      for name in SITES}
        site_01, site_02 = (Daemon(["client", "start", "--site", str(site_files[name])], root / f"{name}.log")
                            for name in SITES)
        started += [site_01, site_02]
        out.first_site_01, out.site_02 = site_01, site_02
        for site in (site_01, site_02):
            site.wait_for(CONNECTED, 60)
        config = root / "federation.yaml"
        config.write_text(OmegaConf.to_yaml(OmegaConf.create(FEDERATION)))
        out.timings["deployed"] = time.monotonic() - t0
        run = Daemon(["run", "--config", str(config), "--state", str(state), "--stream"], root / "run.log")
        started.append(run)

        # Round 1: site-02's ClientApp is held; site-01 answers, then restarts before round 2.
        site_02.wait_for("Sent successfully", RUN_TIMEOUT_S)  # its answer to the coordinator's query
        held = wait_for_process(site_02, CLIENTAPP, RUN_TIMEOUT_S, set(processes_named(site_02.proc.pid, CLIENTAPP)))
        held = clientapp_worker(site_02, held)  # the warm starter's child, not its launcher
        os.kill(held, signal.SIGSTOP)
        _wait_count(site_01, "Sent successfully", 2, RUN_TIMEOUT_S)  # the query, then round 1
        time.sleep(COLLECT_S)
        site_01.stop()
        assert "SuperNode stopped" in site_01.output, site_01.output[-2000:]
        site_01 = Daemon(["client", "start", "--site", str(site_files["site-01"])], root / "site-01-restarted.log")
        started.append(site_01)
        out.site_01 = site_01
        site_01.wait_for(CONNECTED, 60)
        out.timings["site restarted"] = time.monotonic() - t0

        # site-02 answers round 1 while the coordinator is paused, so that round 2 cannot go out
        # before site-02's SuperNode is paused below, however late the test reads site-02's log
        # (the SuperNode asks for work every 3 s).
        (serverapp,) = processes_named(server.proc.pid, "flwr-serverapp")
        server.remember_tree()
        os.kill(serverapp, signal.SIGSTOP)
        paused.append(serverapp)
        os.kill(held, signal.SIGCONT)
        _wait_count(site_02, "Sent successfully", 2, RUN_TIMEOUT_S)
        # site-02's SuperNode is paused too, until the run's ServerApp is dead and the resume refused:
        # the answer that carries round 2's message must then reach it within its HTTP timeout of 30 s,
        # and on a loaded machine the refusal alone took 23 s.
        (supernode,) = processes_named(site_02.proc.pid, "flower-supernode")
        os.kill(supernode, signal.SIGSTOP)
        paused.append(supernode)
        os.kill(serverapp, signal.SIGCONT)
        paused.remove(serverapp)
        _wait_latest(out.run_dir / "ckpt", "round-0001", run, RUN_TIMEOUT_S)
        relay.mark("round 1 checkpointed")
        site_01.wait_for("Receiving: train message", RUN_TIMEOUT_S)  # round 2 is out
        relay.mark("site-01 received round 2")
        os.kill(serverapp, signal.SIGKILL)
        relay.mark("ServerApp killed")
        out.killed_run = run.output.split("run ", 1)[1].split()[0]
        ended = {"site-01": wait_for_process(site_01, CLIENTAPP, 30)}  # training round 2 of the killed run
        # The SuperLink still lists the killed run as running: resuming now would give one run
        # folder two writers, so fedmri refuses and says how to stop it.
        out.refused = fedmri_cli("run", "--config", str(config), "--state", str(state), "--resume", timeout=90)
        relay.mark("resume refused")
        # The only large answer that site-02 can get now is round 2's message (the small ones, "no
        # work" and heartbeats, pass): it waits in the relay until the run has ended.
        relay.hold("down", at_least=WORK_BYTES)
        os.kill(supernode, signal.SIGCONT)
        paused.remove(supernode)
        wait_until(lambda: relay.kept_bytes["down"] >= WORK_BYTES, 30,  # site-02 asks for work every 3 s
                   f"site-02 was not sent round 2's message within 30 s:\n{relay.describe()}")
        flwr_json(["stop", out.killed_run, "fedmri"], state / "flwr", timeout=60)
        relay.mark("run stopped")
        out.timings["run killed and stopped"] = time.monotonic() - t0
        before = set(processes_named(site_02.proc.pid, CLIENTAPP))
        relay.let_go("down")
        # site-02's SuperNode takes round 2's message, cannot fetch its content and drops it; Flower
        # has started a ClientApp for it all the same.
        ended_line = rf"Run ID {out.killed_run} is not in `RUNNING` status. Ignoring"
        site_02.wait_for(ended_line + " message", 30)
        ended["site-02"] = wait_for_process(site_02, CLIENTAPP, 30, before)

        # The documented resume command, at once. Meanwhile each site's ClientApp of the ended run
        # must go: site-02's now, site-01's once its reply to round 2 is refused.
        out.resumed = Daemon(["run", "--config", str(config), "--state", str(state), "--resume", "--stream"],
                             root / "resumed.log")
        started.append(out.resumed)
        for name, site in zip(SITES, (site_01, site_02)):
            out.left[name] = _outlives_its_run(site, ended[name], ended_line)
        out.timings["ended run's ClientApps gone"] = time.monotonic() - t0
        assert run.wait_exit(60, watch=[server, site_01, site_02]) == 1
        assert f"run {out.killed_run}: finished:stopped" in run.output, run.output[-3000:]
        out.resumed.wait_exit(RUN_TIMEOUT_S, watch=[server, site_01, site_02])
        out.timings["resumed run done"] = time.monotonic() - t0
        print(f"\ntimings, seconds from the start of the deployment: {out.timings}")
        yield out
    except BaseException:
        print(f"site-02's link, the relay (also in {root / 'relay.log'}):\n{relay.describe()}")
        raise
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_all(started)
        relay.close()
        (root / "relay.log").write_text(relay.describe(lines=100_000))


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(played: Played, federation_sites: list,
                                                                  one_thread: None, tmp_path: Path) -> None:
    """Bit-identical: sites seed each round from (seed, stage, round, site name), never from the
    node id or the run, and the coordinator aggregates in an order set by the updates' content."""
    from helpers.identity import server_identity
    from helpers.local_grid import LocalGrid

    from fedmri.server.config import load_federation
    from fedmri.server.pipeline import Pipeline

    resumed = played.resumed
    assert resumed is not None and resumed.proc.returncode == 0, resumed.output[-4000:] if resumed else None
    assert re.search(r"run \d+: finished:completed", resumed.output)
    assert f"resuming {NAME} after global round 1" in resumed.output
    assert json.loads((played.run_dir / "state.json").read_text())["status"] == "finished"

    body = FEDERATION | {"run_root": str(tmp_path / "runs")}
    straight = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))))
    with server_identity():
        straight.run_all(LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(federation_sites[:2])}))
    final = load_file(str(played.run_dir / "ckpt" / "round-0002" / "global.safetensors"))
    assert sorted(final) == sorted(straight.state)
    assert [k for k in final if not torch.equal(final[k], straight.state[k])] == []


def test_resume_while_the_killed_run_is_still_listed_is_refused(played: Played) -> None:
    out = played.refused
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text
    assert f"is still running as Flower run {played.killed_run}" in text and "flwr stop" in text, text


def test_status_shows_the_killed_run_and_its_resumption(played: Played) -> None:
    out = fedmri_cli("status", "--state", str(played.state), "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    runs = {r["run_id"]: r for r in json.loads(out.stdout)["runs"] if r["name"] == NAME}
    assert played.resumed is not None
    resumed = re.search(r"run (\d+) submitted", played.resumed.output).group(1)
    assert {k: r["status"] for k, r in runs.items()} == {played.killed_run: "finished:stopped",
                                                          resumed: "finished:completed"}


def test_a_site_restarted_between_rounds_takes_part_in_the_next(played: Played) -> None:
    rows = [json.loads(line) for line in (played.run_dir / "metrics.jsonl").read_text().splitlines()]
    for server_round in (1, 2):
        assert {r["site"] for r in rows if r["server_round"] == server_round and r["status"] == "ok"} == set(SITES), rows
        aggregate = next(r for r in rows if r["server_round"] == server_round and r["site"] == "all")
        assert aggregate["status"] == "aggregated" and aggregate["sites"] == 2
    # Round 1 went to the first daemon; round 2 (killed, then resumed) to the restarted one.
    assert played.first_site_01 is not None and played.site_01 is not None
    assert played.first_site_01.output.count("Receiving: train message") == 1
    assert played.site_01.output.count("Receiving: train message") == 2


def test_a_site_drops_the_clientapp_of_a_run_that_ended(played: Played) -> None:
    """site-02's ClientApp waited for content that would never come: `fedmri client start` stopped it.
    site-01's was training round 2 when the run ended; Flower ends it once its reply is refused."""
    assert played.site_02 is not None
    assert played.left == {"site-01": {}, "site-02": {}}, played.left
    assert re.search(rf"stopping the ClientApp \(process \d+\) of run {played.killed_run}", played.site_02.output), \
        played.site_02.output[-3000:]
