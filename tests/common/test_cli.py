"""The `fedmri` command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import subprocess
import sys

import yaml

import fedmri


def fedmri_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from fedmri.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_version() -> None:
    out = fedmri_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"fedmri {fedmri.__version__}"


def test_help_lists_every_group() -> None:
    out = fedmri_cli("--help")
    assert out.returncode == 0
    for group in ("data", "config", "client", "server", "certs", "run", "status", "export", "simulate"):
        assert group in out.stdout


def test_config_show_prints_resolved_yaml() -> None:
    out = fedmri_cli("config", "show", "tiny", "model.depth=2", "seed=3")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["depth"] == 2 and cfg["seed"] == 3 and cfg["model"]["embed_dim"] == 96


def test_user_error_is_one_line_without_traceback() -> None:
    out = fedmri_cli("config", "show", "tiny", "model.nope=1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.nope" in lines[0]


def test_every_role_command_is_mounted() -> None:
    out = fedmri_cli("--help")
    assert out.returncode == 0
    for command in ("data", "config", "certs", "server", "client", "run", "status", "export", "simulate"):
        assert command in out.stdout, command
    assert "not available" not in out.stdout


def test_export_of_a_folder_that_is_not_a_run_is_one_clear_line(tmp_path) -> None:
    out = fedmri_cli("export", str(tmp_path))
    assert out.returncode == 2
    assert "not a run folder" in out.stderr and "Traceback" not in out.stderr

def test_run_resume_sets_resume_in_the_federation_sent() -> None:
    from fedmri.cli.run_cmd import with_resume
    from fedmri.server.config import load_federation

    text = "name: x\nmin_sites: 2\nstages:\n  - {name: pretrain, rounds: 2, local_steps: 3}\n"
    assert load_federation(text=text).resume is False
    resumed = load_federation(text=with_resume(text))
    assert resumed.resume is True and resumed.name == "x" and resumed.stages[0].rounds == 2


def test_a_run_of_the_same_name_still_on_the_superlink_is_found() -> None:
    from fedmri.cli.run_cmd import running_with_name

    runs = [{"run-id": 1, "status": "finished:completed"}, {"run-id": 2, "status": "running"},
            {"run-id": 3, "status": "pending"}]
    submitted = {"1": {"name": "demo"}, "2": {"name": "other"}, "3": {"name": "demo"}}
    assert running_with_name(runs, submitted, "demo") == ("3", "pending")
    assert running_with_name(runs, submitted, "other") == ("2", "running")
    assert running_with_name(runs[:1], submitted, "demo") is None  # finished: a resume may go
    assert running_with_name(runs, {}, "demo") is None  # not submitted through fedmri: not ours to judge
