"""``fedmri run`` and ``fedmri status``: the coordinator launches and watches runs on a running server.

A run is submitted with ``flwr run APP_DIR FEDERATION --run-config FILE``.
APP_DIR holds a single ``pyproject.toml`` that names the installed components
``fedmri.server.app:app`` and ``fedmri.client.app:app``: no Python module
travels, so the code that runs at each site is the fedmri that site installed.
The federation YAML travels as text in the run config key ``fedmri-config``.

With ``--state`` (the folder given to ``fedmri server start``) the commands use
the Flower CLI config written there and record each submission in
``STATE/submissions/``; without it they use Flower's own ``$FLWR_HOME``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from fedmri import __version__
from fedmri.errors import FedmriError, InputError

RUN_CONFIG_KEY = "fedmri-config"

_STATE = typer.Option(None, "--state", envvar="FEDMRI_STATE",
                      help="The --state folder of `fedmri server start` (default: Flower's own $FLWR_HOME).")
_FEDERATION = typer.Option(None, "--federation", help="Connection name (default: the default in config.toml).")


def _home(state: Path | None) -> Path:
    from fedmri.server.daemon import flwr_home

    if state is not None:
        return flwr_home(state)
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def app_pyproject() -> str:
    """The only file of the app bundle: component names, and the run config key the federation YAML fills."""
    return f'''# Written by `fedmri run`: the Flower app is the fedmri installed at each site.
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedmri"
version = "{__version__}"
description = "fedmri federated run (components come from the installed fedmri package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmri"

[tool.flwr.app.components]
serverapp = "fedmri.server.app:app"
clientapp = "fedmri.client.app:app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = ""
fedmri-task = "pipeline"
fedmri-search = ""
'''


def _read_federation(path: Path, state: Path | None) -> tuple[str, str, Path | None]:
    """The federation YAML's text, the run's name and (with a state folder) its run folder.

    The coordinator's own fedmri checks the file first when it has the
    federation config loader, so a bad key fails here and not on the server.
    """
    path = path.expanduser()
    if not path.is_file():
        raise InputError(f"federation config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        from fedmri.server.config import load_federation
    except ImportError:  # an older fedmri without the loader: check only that it is a YAML mapping
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"federation config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"federation config {path} must be a YAML mapping (key: value lines)")
        name, run_root = str(data.get("name") or path.stem), str(data.get("run_root") or "runs")
    else:
        fed = load_federation(path)
        name, run_root = str(fed.name), str(fed.run_root)
    run_dir = None
    if state is not None:  # the ServerApp works in STATE (see fedmri.server.daemon)
        root = Path(run_root).expanduser()
        run_dir = (root if root.is_absolute() else state.expanduser().resolve() / root) / name
    return text, name, run_dir


def run_command(
    config: Path = typer.Option(..., "--config", help="The federation YAML (stages, rounds, strategy, model)."),
    federation: str | None = _FEDERATION,
    state: Path | None = _STATE,
    stream: bool = typer.Option(False, "--stream/--no-stream", help="Follow the run's log until it ends."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the run of the same name from its last complete round."),
) -> None:
    """[coordinator] Launch a federated run on a running server; prints the run id."""
    import tomli_w

    from fedmri.flower_cli import child_env, flower_executable, flwr_json
    from fedmri.server.daemon import read_connection

    home = _home(state)
    name, _ = read_connection(home, federation)
    text, run_name, run_dir = _read_federation(config, state)
    if resume:
        text = with_resume(text)
    if state is not None:  # two runs of one name would write one run folder
        busy = running_with_name(flwr_json(["ls", name], home, timeout=60).get("runs", []), _submissions(state),
                                 run_name)
        if busy is not None:
            raise InputError(f"run {run_name!r} is still {busy[1]} as Flower run {busy[0]}; wait for it to end or "
                             f"stop it with `FLWR_HOME={home} flwr stop {busy[0]} {name}`, then run this again")
    with tempfile.TemporaryDirectory(prefix="fedmri-run-") as tmp:
        app_dir = Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app_pyproject())
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(tomli_w.dumps({RUN_CONFIG_KEY: text}))
        answer = flwr_json(["run", str(app_dir), name, "--run-config", str(overrides)], home, timeout=120)
    run_id = str(answer.get("run-id"))
    if state is not None:
        _record_submission(state, run_id, run_name, run_dir, config, text, name)
    typer.echo(f"run {run_id} submitted to federation '{name}' ({run_name}, from {config})")
    if not stream:
        typer.echo(f"follow it with `fedmri status{_state_flag(state)}` or "
                   f"`FLWR_HOME={home} flwr log {run_id} {name}`")
        return
    env = child_env({"FLWR_HOME": str(home)})
    try:
        subprocess.run([flower_executable("flwr"), "log", run_id, name, "--stream"], env=env,
                       stdin=subprocess.DEVNULL, check=False)
    except KeyboardInterrupt:
        typer.echo(f"stopped following; run {run_id} goes on (`fedmri status{_state_flag(state)}`)")
        raise typer.Exit(130) from None
    runs = flwr_json(["ls", name, "--run-id", run_id], home).get("runs", [])
    status = runs[0].get("status", "unknown") if runs else "unknown"
    typer.echo(f"run {run_id}: {status}")
    if status != "finished:completed":  # also a run the stream stopped following before it ended
        cause = run_failure_cause(run_id, run_dir, flwr_log(run_id, name, home))
        if cause:
            typer.echo(f"run {run_id} cause: {cause}")
        typer.echo(f"full log: FLWR_HOME={home} flwr log {run_id} {name} --show")
        raise typer.Exit(1)


# The last line of a Python traceback: the exception's type and message.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt)\w*)(?::\s*(.*))?$")
# What the ServerApp logs when a pipeline fails (fedmri.server.app.run_pipeline).
_FAILED_LINE = re.compile(r"fedmri: run \S+ failed: (.*)$")
# A Flower log line's colour codes and level prefix.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(?:\S+\s+)?(?:ERROR|INFO|WARNING|DEBUG)\s*:\s*")


def running_with_name(flower_runs: list[dict[str, Any]], submissions: dict[str, dict[str, Any]],
                      run_name: str) -> tuple[str, str] | None:
    """``(run id, status)`` of a run the SuperLink has not finished that fedmri submitted as ``run_name``."""
    for run in flower_runs:
        run_id, status = str(run.get("run-id")), str(run.get("status", ""))
        if not status.startswith("finished") and submissions.get(run_id, {}).get("name") == run_name:
            return run_id, status
    return None


def ended_badly(status: object) -> bool:
    """Whether a Flower run status says the run ended without completing (failed, stopped)."""
    return str(status).startswith("finished:") and status != "finished:completed"


def flwr_log(run_id: str, federation: str, home: Path, timeout: float = 60) -> str:
    """The run's whole Flower log (``flwr log RUN --show``), empty if it cannot be read."""
    from fedmri.flower_cli import child_env, flower_executable

    try:
        out = subprocess.run([flower_executable("flwr"), "log", run_id, federation, "--show"], capture_output=True,
                             text=True, env=child_env({"FLWR_HOME": str(home)}), stdin=subprocess.DEVNULL,
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def run_failure_cause(run_id: str, run_dir: Path | None, log_text: str = "") -> str | None:
    """Why a run did not complete, in one line: what the ServerApp recorded, else the log's last exception.

    Args:
        run_id: The Flower run id.
        run_dir: The run folder, whose state.json a failed pipeline marks with ``error``.
        log_text: The run's Flower log, searched when the run folder says nothing
            (a failure before the pipeline started, or a ServerApp that was killed).
    """
    recorded = _recorded_cause(_read_state(run_dir / "state.json") if run_dir is not None else None, run_id)
    if recorded is not None:
        return recorded
    found = None
    for raw in log_text.splitlines():
        line = _LEVEL.sub("", _ANSI.sub("", raw).strip())
        if (match := _FAILED_LINE.search(line)) is not None:
            return match.group(1)
        if _EXCEPTION_LINE.match(line) is not None:
            found = line
    return found


def _recorded_cause(state: dict[str, Any] | None, run_id: str) -> str | None:
    """The cause a failed pipeline wrote into its run folder's state.json, if that state is ``run_id``'s."""
    if state and state.get("status") == "failed" and state.get("error") and str(state.get("run_id", run_id)) == run_id:
        return str(state["error"])
    return None


def with_resume(text: str) -> str:
    """The federation YAML with ``resume: true``: the ServerApp reads it from the config it is sent."""
    import yaml

    body = yaml.safe_load(text) or {}
    body["resume"] = True
    return yaml.safe_dump(body, sort_keys=False)


def _state_flag(state: Path | None) -> str:
    return f" --state {state}" if state is not None else ""


def _record_submission(state: Path, run_id: str, run_name: str, run_dir: Path | None, config: Path, text: str,
                       federation: str) -> None:
    folder = state.expanduser().resolve() / "submissions"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.yaml").write_text(text, encoding="utf-8")
    record = {"run_id": run_id, "name": run_name, "run_dir": str(run_dir) if run_dir else None, "federation": federation,
              "config": str(config.resolve()),
              "submitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (folder / f"{run_id}.json").write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------- status
def _read_state(path: Path) -> dict[str, Any] | None:
    """A run folder's ``state.json`` or ``privacy.json``, None if absent; a bad file says so."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"{path} unreadable: {exc}"}
    return value if isinstance(value, dict) else {"error": f"{path} is not a JSON object"}


def _submissions(state: Path | None) -> dict[str, dict[str, Any]]:
    if state is None:
        return {}
    out = {}
    for path in (state.expanduser().resolve() / "submissions").glob("*.json"):
        try:
            record = json.loads(path.read_text())
            out[str(record["run_id"])] = record
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def collect_status(federation: str | None, state: Path | None, runs_dir: Path | None) -> dict[str, Any]:
    """Everything ``fedmri status`` shows, as one JSON-ready dict.

    Runs come from the SuperLink (``flwr ls``), sites from ``flwr supernode ls``
    (named from ``STATE/sites.json``); stage, round, sites and metrics from each
    run folder's ``state.json`` when the pipeline has written one, and for a
    failed run its cause (``cause``: the error the ServerApp recorded there); the
    privacy spent from its ``privacy.json`` (``fedmri.server.privacy_report``).
    """
    from fedmri.flower_cli import flwr_json
    from fedmri.server.daemon import read_connection, runs_folder, site_nodes

    home = _home(state)
    name, entry = read_connection(home, federation)
    report: dict[str, Any] = {"federation": name, "address": entry.get("address"), "reachable": True,
                              "error": None, "sites": [], "runs": [], "run_folders": {}}
    try:
        flower_runs = flwr_json(["ls", name], home, timeout=30).get("runs", [])
        nodes = flwr_json(["supernode", "ls", name], home, timeout=30).get("nodes", [])
    except FedmriError as exc:
        report.update(reachable=False, error=str(exc))
        flower_runs, nodes = [], []
    names = site_nodes(state) if state is not None else {}
    report["sites"] = [{"site": names.get(str(n.get("node-id"))), "node_id": str(n.get("node-id")),
                        "status": n.get("status"), "online_at": n.get("online-at")} for n in nodes]
    if runs_dir is None and state is not None:
        runs_dir = runs_folder(state)
    folders = {p.parent: _read_state(p) for p in sorted(runs_dir.glob("*/state.json"))} if runs_dir else {}
    submitted = _submissions(state)
    for run in flower_runs:
        run_id = str(run.get("run-id"))
        record = submitted.get(run_id, {})
        run_dir = Path(record["run_dir"]) if record.get("run_dir") else None
        if run_dir is None:  # a state.json that names its Flower run
            run_dir = next((d for d, st in folders.items() if st and str(st.get("run_id")) == run_id), None)
        pipeline = _read_state(run_dir / "state.json") if run_dir is not None else None
        folders.pop(run_dir, None)
        report["runs"].append({"run_id": run_id, "status": run.get("status"), "elapsed_s": run.get("elapsed"),
                               "name": record.get("name") or (run_dir.name if run_dir else None),
                               "run_dir": str(run_dir) if run_dir else None, "pipeline": pipeline,
                               "cause": _recorded_cause(pipeline, run_id) if ended_badly(run.get("status")) else None})
    report["run_folders"] = {str(d): st for d, st in folders.items()}
    run_dirs = [run["run_dir"] for run in report["runs"] if run["run_dir"]] + list(report["run_folders"])
    report["privacy"] = {d: p for d in run_dirs if (p := _read_state(Path(d) / "privacy.json")) is not None}
    return report


def _pipeline_cells(pipeline: dict[str, Any] | None) -> list[str]:
    if not pipeline:
        return ["", "", "", ""]
    if "error" in pipeline and len(pipeline) == 1:  # the full reason is in --json
        return ["(state.json unreadable)", "", "", ""]
    sites = pipeline.get("sites")
    sites_text = ", ".join(map(str, sites)) if isinstance(sites, list) else str(sites or "")
    metrics = pipeline.get("metrics", pipeline.get("last_metrics")) or {}
    metrics_text = (", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
                    if isinstance(metrics, dict) else str(metrics))
    return [str(pipeline.get("stage", "")), str(pipeline.get("round", "")), sites_text, metrics_text]


def status_command(
    federation: str | None = _FEDERATION,
    state: Path | None = _STATE,
    runs: Path | None = typer.Option(None, "--runs", help="Folder of run folders (default: STATE/runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    # Annotated, so that a direct call (tests, scripts) gets plain defaults rather than typer's OptionInfo.
    watch: Annotated[bool, typer.Option("--watch", help="Follow the running rounds live from the run folders: which "
                                        "sites replied, which are pending and for how long, which declined and "
                                        "why.")] = False,
    run: Annotated[Path | None, typer.Option("--run", help="With --watch: this run folder only (e.g. a "
                                             "simulation's runs/demo/federated); no server needed.")] = None,
    interval: Annotated[float, typer.Option("--interval", help="With --watch: seconds between refreshes.")] = 2.0,
    frames: Annotated[int, typer.Option("--frames", hidden=True, help="With --watch: stop after this many "
                                        "(0: until Ctrl-C).")] = 0,
) -> None:
    """[coordinator] Show the server's sites and runs, with stage, round, sites and last metrics."""
    if watch:
        _watch(run, runs, state, interval, frames)
        return
    report = collect_status(federation, state, runs)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, shutil.get_terminal_size().columns))
    if not report["reachable"]:
        console.print(f"[yellow]SuperLink {report['address']} not reachable:[/] {report['error']}", highlight=False)
    else:
        online = [s["site"] or f"node {s['node_id']}" for s in report["sites"] if s["status"] == "online"]
        console.print(f"federation '{report['federation']}' at {report['address']}: {len(online)} of "
                      f"{len(report['sites'])} registered site(s) online{': ' if online else ''}{', '.join(online)}",
                      highlight=False)
    table = Table(title="runs")
    for column in ("run id", "status", "elapsed", "name", "stage", "round", "sites", "last metrics"):
        table.add_column(column)
    for run in report["runs"]:
        elapsed = run["elapsed_s"]
        table.add_row(run["run_id"], str(run["status"]), f"{elapsed:.0f} s" if isinstance(elapsed, float) else "",
                      run["name"] or "", *_pipeline_cells(run["pipeline"]))
    for folder, pipeline in report["run_folders"].items():
        table.add_row("", "(folder only)", "", Path(folder).name, *_pipeline_cells(pipeline))
    console.print(table)
    for run in report["runs"]:
        if run.get("cause"):
            console.print(f"run {run['run_id']} ({run['name'] or '?'}) {run['status']}: {run['cause']}",
                          highlight=False, markup=False)
        elif ended_badly(run["status"]):
            console.print(f"run {run['run_id']} ({run['name'] or '?'}) {run['status']}: see "
                          f"`flwr log {run['run_id']} {report['federation']} --show`", highlight=False, markup=False)
    for folder, summary in report["privacy"].items():
        console.print("\n  ".join([f"privacy of {Path(folder).name}:", *_privacy_lines(summary)]),
                      highlight=False, markup=False)


def _watched_folders(run: Path | None, runs: Path | None, state: Path | None) -> list[Path]:
    """The run folder given, else those under the runs folder whose state.json says running (newest first)."""
    if run is not None:
        if not (run / "federation.yaml").is_file():
            raise InputError(f"{run} is not a run folder (it has no federation.yaml); pass the folder a run "
                             "writes into, e.g. runs/demo/federated")
        return [run]
    if runs is None and state is not None:
        from fedmri.server.daemon import runs_folder

        runs = runs_folder(state)
    if runs is None:
        raise InputError("--watch needs --run RUN_FOLDER, --runs FOLDER or --state STATE")
    found = [(p.parent, _read_state(p) or {}) for p in runs.glob("**/state.json")]
    running = [d for d, st in found if st.get("status") == "running"]
    return sorted(running, key=lambda d: (d / "state.json").stat().st_mtime, reverse=True)


def _watch(run: Path | None, runs: Path | None, state: Path | None, interval: float, frames: int) -> None:
    from fedmri.server.watch import watch_lines

    shown = 0
    try:
        while True:
            folders = _watched_folders(run, runs, state)
            lines = [line for folder in folders for line in watch_lines(folder)] or ["no running run found"]
            if shown and sys.stdout.isatty():
                typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the terminal between frames
            typer.echo("\n".join(lines))
            shown += 1
            if frames and shown >= frames:
                return
            time.sleep(max(0.2, interval))
    except KeyboardInterrupt:
        return


def _privacy_lines(summary: dict[str, Any]) -> list[str]:
    from fedmri.server.privacy_report import status_lines

    if "error" in summary:
        return [str(summary["error"])]
    try:
        return status_lines(summary)
    except (KeyError, TypeError, AttributeError, ValueError):
        return ["privacy.json has a layout this fedmri does not know; see it in the run folder"]
