"""A run that fails says why: the ServerApp records the cause in the run folder, and the CLI finds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedmri.cli.run_cmd import run_failure_cause
from fedmri.errors import FedmriError
from fedmri.server.app import run_pipeline
from fedmri.server.config import load_federation
from fedmri.server.rundir import RunDir, failure_cause

from helpers.local_grid import LocalGrid


def test_a_failed_pipeline_marks_its_run_folder_with_the_cause(tmp_path: Path) -> None:
    body = {"name": "nobody-came", "preset": "micro", "min_sites": 2, "run_root": str(tmp_path / "runs"),
            "stages": [{"name": "pretrain", "rounds": 1, "local_steps": 1}], "export": False, "wait_for_sites_s": 0}
    fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))
    with pytest.raises(FedmriError, match="only 0 of min_sites=2"):
        run_pipeline(LocalGrid({}), fed, run_id=42)
    run_dir = tmp_path / "runs" / "nobody-came"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and state["run_id"] == "42"
    assert state["error"].startswith("FedmriError: only 0 of min_sites=2 eligible sites connected")
    # What `fedmri run` and `fedmri status` print for this run, and only for this run.
    assert run_failure_cause("42", run_dir) == state["error"]
    assert run_failure_cause("43", run_dir) is None


def test_the_cause_keeps_the_stage_and_round_and_fits_one_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    run.write_state(name="r", status="running", stage="align", round=2)
    cause = run.record_failure(ValueError("bad weights\n  at line 3"), run_id=7)
    assert cause == "ValueError: bad weights"
    assert run.read_state() | {"updated": None} == {"name": "r", "status": "failed", "stage": "align", "round": 2,
                                                     "error": cause, "run_id": "7", "updated": None}
    assert failure_cause(RuntimeError("x" * 1000)).endswith("...") and len(failure_cause(RuntimeError("x" * 1000))) == 400
    assert failure_cause(KeyError()) == "KeyError"


def test_without_a_run_folder_the_cause_comes_from_the_log() -> None:
    log = ("\x1b[92mINFO \x1b[0m:      fedmri: pretrain round 1/2 (global 1): 2 sites, 1.4 MB down each\n"
           "Traceback (most recent call last):\n"
           '  File "x.py", line 3, in main\n'
           "sqlite3.OperationalError: database is locked\n"
           "\x1b[91mERROR \x1b[0m:     Exit Code: 1\n")
    assert run_failure_cause("5", None, log) == "sqlite3.OperationalError: database is locked"
    recorded = log + "\x1b[91mERROR \x1b[0m:     fedmri: run demo failed: FedmriError: only 1 of 2 sites\n"
    assert run_failure_cause("5", None, recorded) == "FedmriError: only 1 of 2 sites"
    assert run_failure_cause("5", None, "INFO : all good\n") is None
