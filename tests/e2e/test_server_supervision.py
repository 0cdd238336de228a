"""`fedmri server start` supervises Flower's ServerApp launcher: a launcher that dies is restarted,
and one that keeps dying stops the server with a clear error instead of a server that accepts runs
that never start."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from deploy_helpers import Daemon, cmdline, free_port, process_tree
from helpers.waiting import wait_until

from fedmri.certs import init_authority
from fedmri.flower_cli import TELEMETRY_ENV, SupervisedChild


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def _launchers(server: Daemon) -> list[int]:
    return [pid for pid in process_tree(server.proc.pid) if "flower-superexec" in cmdline(pid)]


def test_a_killed_launcher_is_restarted_and_runs_still_start(daemons: list[Daemon], tmp_path: Path) -> None:
    certs = init_authority(tmp_path / "certs", ["localhost", "127.0.0.1"], []).folder
    port = free_port()
    state = tmp_path / "state"
    # Started as a coordinator would start it: with nothing said about Flower's telemetry.
    env = {k: v for k, v in os.environ.items() if k != TELEMETRY_ENV}
    server = Daemon(["server", "start", "--certs", str(certs), "--state", str(state), "--host", "127.0.0.1",
                     "--port", str(port)], tmp_path / "server.log", env=env)
    daemons.append(server)
    server.wait_for(r"SuperLink ready at https://", 90)
    first = wait_until(lambda: _launchers(server), 30, "no launcher within 30 s", poll=0.2)
    assert len(first) == 1
    superlink = [pid for pid in process_tree(server.proc.pid) if "flower-superlink" in cmdline(pid)]
    assert len(superlink) == 1
    for pid in (*superlink, *first):  # Flower's own processes: no telemetry to telemetry.flower.ai
        assert _environ(pid).get(TELEMETRY_ENV) == "0", cmdline(pid)
    server.remember_tree()
    os.kill(first[0], signal.SIGKILL)  # as the burst of issue 18 did
    server.wait_for(r"the ServerApp launcher \(flower-superexec\) exited \(code -9\); restarting it", 30)
    second = wait_until(lambda: [p for p in _launchers(server) if p not in first], 30, "no new launcher within 30 s",
                        poll=0.2)
    assert len(second) == 1 and server.proc.poll() is None
    server.remember_tree()

    # A run submitted now reaches a ServerApp: it fails for want of sites, and says so.
    config = tmp_path / "federation.yaml"
    config.write_text("name: after-restart\npreset: micro\nmin_sites: 1\nwait_for_sites_s: 1\n"
                      "stages: [{name: evaluate}]\n")
    run = Daemon(["run", "--config", str(config), "--state", str(state), "--stream"], tmp_path / "run.log")
    daemons.append(run)
    assert run.wait_exit(240, watch=[server]) == 1
    assert "cause: FedmriError: only 0 of min_sites=1 eligible sites connected" in run.output


def test_a_launcher_that_keeps_dying_is_given_up_on(capsys) -> None:
    said: list[str] = []
    child = SupervisedChild([sys.executable, "-c", "import sys; sys.exit(3)"], env=dict(os.environ), name="x",
                            max_restarts=2, window_s=60, say=said.append)
    child.start()
    outcomes = []
    for _ in range(3):
        child.proc.wait(timeout=30)
        outcomes.append(child.check())
    assert outcomes == [True, True, False]
    assert said[0] == "x exited (code 3); restarting it (1 of 2 restarts allowed in 60 s)"
    assert said[-1] == "error: x exited (code 3) 3 times within 60 s; giving up"
    child.stop()  # already gone: a no-op
