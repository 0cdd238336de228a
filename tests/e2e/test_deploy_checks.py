"""What the deployment commands check before starting anything: one clear line, exit code 2.

No SuperLink runs here; `fedmri status` meets a SuperLink that is down.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from deploy_helpers import fedmri_cli, free_port, write_site

from fedmri.certs import init_authority
from fedmri.server.daemon import write_connection


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_authority(tmp_path_factory.mktemp("certs"), ["localhost"], ["site-01"]).folder


def _user_error(out, *needles: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


def test_client_check_builds_the_supernode_command(certs: Path, tmp_path: Path) -> None:
    site = write_site(tmp_path / "a b", "site-01", "127.0.0.1:9092", certs / "ca.crt", certs / "site-01.key", 9200)
    out = fedmri_cli("client", "check", "--site", str(site))
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout.strip().splitlines()[-1])
    assert command[0].startswith("FLWR_HOME=") and command[1].endswith("flower-supernode")
    args = dict(zip(command[2::2], command[3::2]))
    assert args["--superlink"] == "127.0.0.1:9092"
    assert args["--root-certificates"] == str(certs / "ca.crt")
    assert args["--auth-supernode-private-key"] == str(certs / "site-01.key")
    assert args["--node-config"] == f'site-config="{site.resolve()}"'
    assert args["--port"] == "9200"
    assert "--insecure" not in command
    assert "no catalog.sqlite" in out.stdout  # an empty catalog folder is allowed, with a warning


def test_client_insecure_only_when_asked_and_with_a_warning(certs: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    (tmp_path / "catalog").mkdir()
    site.write_text("name: s\ncatalog: catalog\nserver: {address: '127.0.0.1:9092', insecure: true}\n")
    out = fedmri_cli("client", "check", "--site", str(site))
    assert out.returncode == 0, out.stderr
    assert "WARNING: insecure" in out.stdout
    command = out.stdout.strip().splitlines()[-1]
    assert "--insecure" in command and "--auth-supernode-private-key" not in command
    site.write_text("name: s\ncatalog: catalog\nserver: {address: '127.0.0.1:9092'}\n")
    _user_error(fedmri_cli("client", "check", "--site", str(site)), "server.root_certificates is not set",
                "ca.crt")
    assert "--insecure" in fedmri_cli("client", "check", "--site", str(site), "--insecure").stdout


@pytest.mark.parametrize("change, needles", [
    ("missing-site", ["does not exist"]),
    ("missing-catalog", ["catalog", "does not exist", "fedmri data index"]),
    ("missing-key", ["server.node_key", "nope.key", "does not exist"]),
    ("bad-address", ["server.address", "HOST:PORT"]),
])
def test_client_start_checks_up_front(certs: Path, tmp_path: Path, change: str, needles: list[str]) -> None:
    key = certs / "site-01.key" if change != "missing-key" else tmp_path / "nope.key"
    address = "127.0.0.1:9092" if change != "bad-address" else "coordinator"
    site = write_site(tmp_path, "site-01", address, certs / "ca.crt", key, 9200)
    if change == "missing-catalog":
        (tmp_path / "catalog").rmdir()
    if change == "missing-site":
        site = tmp_path / "absent.yaml"
    out = fedmri_cli("client", "start", "--site", str(site), timeout=60)
    _user_error(out, str(site) if change != "missing-catalog" else str(tmp_path / "catalog"), *needles)


def test_server_start_checks_certs(certs: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    _user_error(fedmri_cli("server", "start", "--state", state), "--certs", "--insecure")
    empty = tmp_path / "empty"
    empty.mkdir()
    _user_error(fedmri_cli("server", "start", "--certs", str(empty), "--state", state),
                "ca.crt", "server.crt", "server.key", "fedmri certs init")
    # The certificate names localhost and 127.0.0.1, not the address asked for.
    _user_error(fedmri_cli("server", "start", "--certs", str(certs), "--state", state, "--host", "10.9.9.9"),
                "10.9.9.9", "--san")
    _user_error(fedmri_cli("server", "start", "--certs", str(certs), "--state", state, "--store", "tape"),
                "--store 'tape' is not one of disk, memory")
    assert not (tmp_path / "state").exists()  # nothing was started or written


def test_the_store_chooses_where_the_superlink_keeps_its_state(certs: Path, tmp_path: Path) -> None:
    from fedmri.server.daemon import IN_MEMORY_STORE, ServerSettings, superlink_command

    def database(store: str) -> str:
        command = superlink_command(ServerSettings(tmp_path / "state", certs, store=store))
        return command[command.index("--database") + 1]

    assert database("disk") == str((tmp_path / "state" / "state.db").resolve())
    assert database("memory") == IN_MEMORY_STORE


def test_run_needs_a_started_server_and_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "federation.yaml"
    config.write_text("name: x\nstages:\n  - {name: evaluate}\n")
    _user_error(fedmri_cli("run", "--config", str(config), "--state", str(tmp_path / "nowhere")),
                "config.toml", "fedmri server start")
    state = tmp_path / "state"
    write_connection(state / "flwr", "fedmri", f"127.0.0.1:{free_port()}", None)  # as `server start` writes it
    _user_error(fedmri_cli("run", "--config", str(tmp_path / "absent.yaml"), "--state", str(state)),
                "absent.yaml")
    _user_error(fedmri_cli("run", "--config", str(config), "--state", str(state), "--federation", "other"),
                "'other'", "fedmri")
    # Checked by the coordinator's own fedmri before anything is submitted.
    config.write_text("name: x\nstages: [{name: nonsense}]\n")
    _user_error(fedmri_cli("run", "--config", str(config), "--state", str(state)), "nonsense")
    assert not (state / "submissions").exists()


def test_status_with_the_superlink_down_still_reads_run_folders(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_connection(state / "flwr", "fedmri", f"127.0.0.1:{free_port()}", None)
    run = state / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"stage": "pretrain", "round": 2, "sites": ["site-01", "site-02"],
                                                "metrics": {"dino_loss": 3.25}}))
    (state / "runs" / "broken").mkdir()
    (state / "runs" / "broken" / "state.json").write_text("{not json")
    (state / "runs" / "fresh").mkdir()  # no state.json yet: not listed, no error

    out = fedmri_cli("status", "--state", str(state), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["reachable"] is False and "unavailable" in report["error"]
    folders = {Path(k).name: v for k, v in report["run_folders"].items()}
    assert folders["demo"]["stage"] == "pretrain" and folders["demo"]["round"] == 2
    assert "unreadable" in folders["broken"]["error"] and "fresh" not in folders

    table = fedmri_cli("status", "--state", str(state))
    assert table.returncode == 0, table.stderr
    assert "not reachable" in table.stdout
    assert "demo" in table.stdout and "pretrain" in table.stdout and "dino_loss=3.25" in table.stdout
    _user_error(fedmri_cli("status", "--state", str(tmp_path / "nowhere")), "fedmri server start")
