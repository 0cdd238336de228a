"""A deployed federation on localhost: `fedmri server start`, `fedmri client start`, `fedmri run`, `fedmri status`.

TLS and SuperNode authentication are on, as in production, and the sites train
for real on the synthetic hospitals of ``federation_sites`` (a 2-block,
32-wide encoder, the micro preset, keeps a round to seconds of compute).

One SuperLink serves the whole module, with five site keys registered
(tests/e2e/deployed_federation.py). Four site daemons start together with it: two
registered sites, one whose key was never registered and one that trusts the wrong
CA; the tests then look at what became of each. The other three registered sites'
SuperNodes start in the test that kills two of them mid-round. Tests run in file
order: the training run sees exactly two sites online, the kill test adds three,
the last test stops the server with SIGTERM. The test that kills a site after it
sent its masked update has its own module and SuperLink (test_deploy_secagg.py). Every process is stopped by the fixtures, pass or fail, and the
e2e conftest checks by process id that none is left.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deploy_helpers import Daemon, fedmri_cli, hold_clientapps, process_tree, wait_for_process
from deployed_federation import GOOD, RUN_TIMEOUT_S, SPARE, SPARES, Federation, start_federation
from deployed_federation import aggregate as _aggregate
from deployed_federation import finish as _finish
from deployed_federation import metrics as _metrics
from deployed_federation import sites as _sites
from deployed_federation import start_run as _start_run
from deployed_federation import start_spares
from deployed_federation import status as _status
from safetensors.torch import load_file

from fedmri import wire
from fedmri.client.daemon import ACTIVATION_PATIENCE_S
from fedmri.server.config import load_federation, run_config


@pytest.fixture(scope="module")
def federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from start_federation(request, tmp_path_factory, refused_sites=True)


def test_wrong_ca_cannot_connect(federation: Federation) -> None:
    client = federation.clients["wrong-ca"]
    assert client.wait_exit(60) == 2
    assert "TLS to the SuperLink" in client.output and str(federation.other_ca) in client.output
    assert "connected to the SuperLink" not in client.output
    assert "warm ClientApp starter" not in client.output  # started only once a SuperNode connects
    federation.clients[GOOD[0]].wait_for(r"connected to the SuperLink[\s\S]*warm ClientApp starter ready", 120)


def test_second_server_on_a_busy_port_says_so(federation: Federation, tmp_path: Path) -> None:
    out = fedmri_cli("server", "start", "--insecure", "--state", str(tmp_path / "state"),
                     "--host", "127.0.0.1", "--port", str(federation.port), timeout=60)
    assert out.returncode == 2
    assert "WARNING: --insecure" in out.stdout  # said before anything else happens
    assert f"127.0.0.1:{federation.port}" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_training_run_then_search_over_tls_with_node_auth(federation: Federation, federation_sites: list,
                                                         daemons: list[Daemon], tmp_path: Path) -> None:
    """One run (pretrain -> align -> evaluate) over TLS with node authentication, then `fedmri search`
    with its aligned model: a ranked list of pseudonymous series ids and scores per site.

    The run uses the bfloat16 wire both ways (``uplink``/``downlink: bf16``), so its uint16 arrays go
    through Flower's real transport (the in-process grid of the other tests passes messages as
    objects); the float32 wire is deployed by the other runs of this module and test_deploy_resume.py.

    One run serves both: every run and every search message starts ClientApp processes,
    the slowest part of this module on the 2-core CI machine.
    """
    assert {name for name, _, _ in federation_sites} >= set(GOOD)  # their catalogs are in the site files
    run, config, run_dir = _start_run(federation, daemons, tmp_path, "e2e",
                                      [{"name": "pretrain", "rounds": 1, "local_steps": 1},
                                       {"name": "align", "rounds": 1, "local_steps": 1}, {"name": "evaluate"}],
                                      uplink="bf16", downlink="bf16")
    run_id = _finish(federation, run)
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"

    # Both sites trained on their own catalogs (site.yaml reached each ClientApp through its
    # SuperNode's node config: an empty catalog would decline) and the rounds aggregated them.
    rows = _metrics(run_dir)
    for server_round in (1, 2):
        assert _sites(rows, server_round, "ok") == set(GOOD), rows
        assert all(r["steps"] == 1 and r["num-examples"] > 0
                   for r in rows if r["server_round"] == server_round and r["status"] == "ok")
        aggregate = _aggregate(rows, server_round)
        assert aggregate["status"] == "aggregated" and aggregate["sites"] == 2
    assert _sites(rows, 3, "ok") == set(GOOD)  # both evaluated the trained model on their val split

    # The global encoder moved away from the run's initial weights (which are reproducible,
    # so a difference is training), and the exported model's encoder is the final global one.
    fed = load_federation(config)
    initial, again = wire.initial_state(run_config(fed)), wire.initial_state(run_config(fed))
    final = load_file(str(run_dir / "ckpt" / "round-0003" / "global.safetensors"))  # the last two rounds are kept
    encoder = [k for k in initial if wire.group_of(k) == wire.ENCODER]
    assert encoder and all(torch.equal(initial[k], again[k]) for k in encoder)
    assert any(not torch.equal(initial[k], final[k]) for k in encoder)
    assert all(torch.isfinite(final[k]).all() for k in encoder)
    # Pretraining's student went down and came back at 2 bytes a value (bytes-down, bytes-up per site).
    student = sum(initial[k].numel() for k in initial if wire.group_of(k) in (wire.ENCODER, wire.DINO_HEAD,
                                                                            wire.CENTER))
    pretrain = [r for r in rows if r["server_round"] == 1 and r["status"] == "ok"]
    assert pretrain and all(r["bytes-down"] == r["bytes-up"] == 2 * student for r in pretrain), (student, pretrain)
    exported = load_file(str(run_dir / "encoder" / "model.safetensors"))
    image = {k[len("image_encoder."):]: v for k, v in exported.items() if k.startswith("image_encoder.")}
    assert sorted(image) == sorted(k.split("/", 1)[1] for k in encoder)
    assert all(torch.equal(image[k.split("/", 1)[1]], final[k]) for k in encoder)

    status = _status(federation)
    # The two started sites, named and online; the spare ones registered but not online;
    # no node for the refused ones.
    assert sorted((s["site"], s["status"] == "online") for s in status["sites"]) == [
        ("site-01", True), ("site-02", True), *((name, False) for name in SPARES)]
    run_row = next(r for r in status["runs"] if r["run_id"] == run_id)
    assert run_row["status"] == "finished:completed" and run_row["name"] == "e2e"
    assert run_row["run_dir"] == str(run_dir.resolve())
    assert json.loads((federation.state / "submissions" / f"{run_id}.json").read_text())["name"] == "e2e"

    out = fedmri_cli("search", "axial FLAIR of the brain", "--config", str(config), "--top-k", "3",
                     "--state", str(federation.state), timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    (saved,) = (run_dir / "search").glob("*.json")
    result = json.loads(saved.read_text())
    results = result["results"]
    assert len(results) == 3 and [r["rank"] for r in results] == [1, 2, 3]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert {r["site"] for r in results} <= set(GOOD) and not result["skipped"]
    assert all(set(r) == {"site", "id", "score", "rank"} and len(r["id"]) == 32 for r in results)
    assert results[0]["id"] in out.stdout  # printed for the coordinator


def test_unregistered_site_key_is_refused(federation: Federation) -> None:
    """The daemon first tries again for a while (a restarted site meets the same refusal until
    its previous SuperNode's heartbeat lapses), then says what to do. It started with the module,
    so by now (after the training run) it has long given up."""
    client = federation.clients["unregistered"]
    assert client.wait_exit(ACTIVATION_PATIENCE_S + 90) == 2
    assert "trying again in" in client.output
    assert "refused this site's key" in client.output and "site-99.pub" in client.output
    assert "connected to the SuperLink" not in client.output
    assert "warm ClientApp starter" not in client.output


def test_a_failed_run_tells_the_coordinator_why(federation: Federation, daemons: list[Daemon],
                                                tmp_path: Path) -> None:
    """Two sites online, five asked for: the run fails, and `fedmri run` and `fedmri status` say why."""
    run, _, run_dir = _start_run(federation, daemons, tmp_path, "too-few", [{"name": "evaluate"}], min_sites=5,
                                 wait_for_sites_s=1)
    assert run.wait_exit(RUN_TIMEOUT_S, watch=[federation.server]) == 1
    run_id = run.output.split("run ", 1)[1].split()[0]
    assert f"run {run_id}: finished:failed" in run.output
    assert f"run {run_id} cause: FedmriError: only 2 of min_sites=5 eligible sites connected" in run.output
    assert f"flwr log {run_id} " in run.output  # where to read the rest
    assert json.loads((run_dir / "state.json").read_text())["status"] == "failed"
    shown = next(r for r in _status(federation)["runs"] if r["run_id"] == run_id)
    assert shown["cause"].startswith("FedmriError: only 2 of min_sites=5")


ROGUE_CLIENT = """
from pathlib import Path

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    Path({marker!r}).write_text("the coordinator's code ran at a site")
    return Message(RecordDict({{"metrics": MetricRecord({{"pwned": 1}})}}), reply_to=msg)
"""

ROGUE_SERVER = """
import json
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.time() + 60
    while len(list(grid.get_node_ids())) < 2 and time.time() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=180)
    answers = [r.error.reason if r.has_error() else "ran" for r in replies]
    Path({answers!r}).write_text(json.dumps(answers))
"""


@pytest.mark.slow
def test_a_bundle_that_ships_its_own_fedmri_is_refused_then_the_genuine_one_runs(
        federation: Federation, federation_sites: list, daemons: list[Daemon], tmp_path: Path) -> None:
    """A coordinator's bundle with a `fedmri` package of its own: every site refuses it before importing
    any of it, says why in its log and keeps running; `fedmri run`'s bundle then runs."""
    from fedmri.cli.run_cmd import app_pyproject
    from fedmri.flower_cli import flwr_json
    from fedmri.server.daemon import flwr_home, read_connection

    marker, answers = tmp_path / "PWNED", tmp_path / "answers.json"
    app = tmp_path / "rogue-app"
    for package in ("fedmri", "fedmri/client", "fedmri/server"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("")
    (app / "pyproject.toml").write_text(app_pyproject())  # the genuine component names, shadowed
    (app / "fedmri/client/app.py").write_text(ROGUE_CLIENT.format(marker=str(marker)))
    (app / "fedmri/server/app.py").write_text(ROGUE_SERVER.format(answers=str(answers)))
    home = flwr_home(federation.state)
    name, _ = read_connection(home, None)
    run_id = str(flwr_json(["run", str(app), name], home, timeout=120).get("run-id"))
    refused = r"refused the coordinator's app bundle: the app bundle carries files besides pyproject.toml \(fedmri/"
    for site in GOOD:
        federation.clients[site].wait_for(refused, RUN_TIMEOUT_S)
    deadline = time.time() + RUN_TIMEOUT_S
    while not answers.is_file() and time.time() < deadline:
        time.sleep(1)
    reasons = json.loads(answers.read_text())
    assert len(reasons) == 2 and all("files besides pyproject.toml" in r for r in reasons), reasons
    assert not marker.exists()
    assert all(federation.clients[site].proc.poll() is None for site in GOOD)  # the sites keep running
    deadline = time.time() + 90
    while True:  # the rogue ServerApp ends once its replies are in: nothing of it is left running
        status = {str(r.get("run-id")): r.get("status") for r in flwr_json(["ls", name], home).get("runs", [])}
        if str(status[run_id]).startswith("finished") or time.time() > deadline:
            break
        time.sleep(2)
    assert str(status[run_id]).startswith("finished"), status

    (tmp_path / "genuine").mkdir()
    run, _, run_dir = _start_run(federation, daemons, tmp_path / "genuine", "after-rogue", [{"name": "evaluate"}])
    _finish(federation, run)
    assert {r["site"] for r in _metrics(run_dir) if r["status"] == "ok"} == set(GOOD)


@pytest.mark.slow
def test_run_completes_when_two_of_five_sites_die_mid_round(federation: Federation, federation_sites: list,
                                                           daemons: list[Daemon], tmp_path: Path) -> None:
    """Five sites, min_sites 3, under secure aggregation with each site's secrets shared among
    its four neighbours, threshold 3: two sites' SuperNodes, with the ClientApps they started
    for round 1, are killed (SIGKILL, no goodbye) after sharing their keys and before sending
    their masked updates. The three survivors' shares of the dead sites' mask keys take those
    masks off the sum of their own three updates, and the run goes on with them.

    What Flower 1.42 does then (measured here, and read in flwr's linkstate): nothing
    at once. The SuperLink keeps a node online until its heartbeat lapses: online
    until its last heartbeat + HEARTBEAT_PATIENCE (2) x its 30 s interval, with
    heartbeats every 17.5-22.5 s, so 37-60 s after the kill. Until then
    ``Grid.send_and_receive`` (which pulls every 3 s) keeps waiting; then its pull
    returns an error reply, ``NODE_UNAVAILABLE``, "Node Unavailable - The
    destination node failed to report a heartbeat within 2 x its expected
    interval", and the round ends. It took 44 s after the kill in one run here.

    A round_timeout_s below that window does not make the dead sites cheaper: round 1
    ends at the timeout, but the SuperLink still lists the nodes as online, so the
    next round samples them and waits out the timeout again; and it risks leaving out
    live sites that are slow (a live site took up to 35 s for a round on this shared
    2-core machine, most of it starting the ClientApp process). So the timeout here is
    generous and the test checks that Flower's error replies, not the timeout, ended
    round 1, and that round 2 no longer sampled the dead sites.
    """
    assert {name for name, _, _ in federation_sites} >= {*GOOD, SPARE}
    timeout, doomed, survivor = 150, SPARES[:2], SPARES[2]
    spares = start_spares(federation, daemons, tmp_path)
    # Under secure aggregation (its four messages per site go through real ClientApp processes, the
    # keys kept in each SuperNode's context): the killed sites shared their keys and masked with the
    # others, so the three survivors' shares of their mask keys must take their masks off the sum.
    run, _, run_dir = _start_run(federation, daemons, tmp_path, "e2e-kill",
                                 [{"name": "pretrain", "rounds": 2, "local_steps": 2,
                                   "secure_aggregation": {"enabled": True, "threshold": 0.5}}],
                                 round_timeout_s=timeout, export=False, min_sites=3, wait_for_sites_s=120)
    # Round 1 is under way at the doomed sites: each shared its keys and its key shares, then its
    # SuperNode took the train message and started the ClientApp process for it (its launcher).
    # Held between the shares' reply and the train message (hold_clientapps), the launcher waits
    # for its fork: forked warm, a micro ClientApp would send its masked update in about a second,
    # before this test could kill it. (The coordinator sends the train messages only once all five
    # sites' shares are in: a second or more after a doomed site's own reply.)
    waiting, deadline = set(doomed), time.monotonic() + RUN_TIMEOUT_S
    while waiting:  # both at once, looked at every 50 ms: the train messages follow the last shares by ~1 s
        for name in [n for n in waiting if "Sending: query.secagg_shares message" in spares[n].output]:
            hold_clientapps(spares[name])
            waiting.discard(name)
        assert time.monotonic() < deadline, {n: spares[n].output[-2000:] for n in waiting}
        time.sleep(0.05)
    for name in doomed:  # the launcher started for the train message, waiting for its fork
        spares[name].wait_for(r"Receiving: train message", RUN_TIMEOUT_S)
        wait_for_process(spares[name], "flwr-clientapp", RUN_TIMEOUT_S)
    for name in doomed:
        killed = spares[name].kill_tree()
        assert any("flower-supernode" in c for c in killed.values()), killed
        assert any("flwr-clientapp" in c for c in killed.values()), killed

    _finish(federation, run)
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"
    rows = _metrics(run_dir)
    alive = {*GOOD, survivor}
    assert _sites(rows, 1, "ok") == alive, rows
    assert set(doomed) <= _sites(rows, 1, "failed"), rows
    assert all("Node Unavailable" in r["reason"] for r in rows
               if r["server_round"] == 1 and r["status"] == "failed" and r["site"] in doomed), rows
    first, second = _aggregate(rows, 1), _aggregate(rows, 2)
    assert first["status"] == "aggregated" and first["sites"] == 3
    assert first["secagg-sites"] == 3 and second["secagg-sites"] == 3
    # Flower's error replies, not the timeout, ended round 1. (The round's wall time is
    # overhead + slowest site: the "all" row's own wall-time-s holds the sites' mean.)
    wall = first["overhead-s"] + max(r["wall-time-s"] for r in rows if r["server_round"] == 1 and r["status"] == "ok")
    assert wall < timeout, rows
    assert _sites(rows, 2, "ok") == alive
    assert not set(doomed) & {r["site"] for r in rows if r["server_round"] == 2}, rows
    assert second["status"] == "aggregated" and second["sites"] == 3


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
