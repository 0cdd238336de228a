"""``fedmri search``: the coordinator searches every site's catalog with a run's aligned model.

The query's embedding goes to the sites; each returns its top-k pseudonymous
series ids and scores, never an image, report or identifier. The search runs
as a Flower run on the coordinator's server (``fedmri-task = "search"``), like
``fedmri run``; its results land in ``<run folder>/search/`` and, with
``--state``, are printed here.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import typer

from fedmri.cli.run_cmd import _FEDERATION, _STATE, _home, _read_federation, app_pyproject
from fedmri.errors import InputError


def search_command(
    text: str = typer.Argument(..., help="Free-text query, e.g. 'axial FLAIR with periventricular lesions'."),
    config: Path = typer.Option(..., "--config", help="The federation YAML of the finished run to search with."),
    top_k: int = typer.Option(10, "--top-k", min=1, max=1000, help="Results per site and in the merged list."),
    split: str = typer.Option("all", "--split", help="Catalog split the sites search: all, train, val or test."),
    federation: str | None = _FEDERATION,
    state: Path | None = _STATE,
) -> None:
    """[coordinator] Text->image search across the sites: pseudonymous series ids and scores only."""
    import tomli_w

    from fedmri.protocol import SEARCH_TASK

    from fedmri.flower_cli import child_env, flower_executable, flwr_json
    from fedmri.server.daemon import read_connection

    if split not in ("all", "train", "val", "test"):
        raise InputError(f"--split {split!r} is not one of all, train, val, test")
    if not text.strip():
        raise InputError("the query text is empty")
    home = _home(state)
    name, _ = read_connection(home, federation)
    _, run_name, run_dir = _read_federation(config, state)
    # The ServerApp works in the server's state folder: a relative run_root resolves there.
    where = str(run_dir) if run_dir is not None else str(Path("runs") / run_name)
    spec = json.dumps({"run_dir": where, "text": text, "top_k": top_k, "split": split})
    with tempfile.TemporaryDirectory(prefix="fedmri-search-") as tmp:
        app_dir = Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app_pyproject())
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"fedmri-task": SEARCH_TASK, "fedmri-search": spec}))
        answer = flwr_json(["run", str(app_dir), name, "--run-config", str(overrides)], home, timeout=120)
    run_id = str(answer.get("run-id"))
    typer.echo(f"search {run_id} submitted to federation '{name}' with the model of {run_name}")
    env = child_env({"FLWR_HOME": str(home)})
    subprocess.run([flower_executable("flwr"), "log", run_id, name, "--stream"], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False)
    runs = flwr_json(["ls", name, "--run-id", run_id], home).get("runs", [])
    status = runs[0].get("status", "unknown") if runs else "unknown"
    if status != "finished:completed":
        typer.echo(f"search {run_id}: {status}; `FLWR_HOME={home} flwr log {run_id} {name}` has the details")
        raise typer.Exit(1)
    if run_dir is None:
        typer.echo(f"done; the results are in the server's {where}/search/ (give --state to print them here)")
        return
    latest = max((run_dir / "search").glob("*.json"), key=lambda p: p.stat().st_mtime)
    print_results(json.loads(latest.read_text()))


def print_results(result: dict) -> None:
    """The merged ranking, one line per series, and the sites left out."""
    typer.echo(f"{len(result['results'])} results for {result['query']!r} (top {result['top_k']}):")
    for row in result["results"]:
        typer.echo(f"  {row['rank']:>3}  {row['score']:.3f}  {row['site']:<12} {row['id']}")
    for site, reason in sorted(result.get("skipped", {}).items()):
        typer.echo(f"  {site} left out: {reason}")
