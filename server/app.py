"""The Flower ServerApp run by the coordinator: reads the run config, runs the pipeline.

The federation config arrives as YAML text in the run config key
``fedmri-config`` (``fedmri run`` puts it there); without it the app runs the
default federation. ``fedmri search`` sends ``fedmri-task = "search"`` and a
JSON ``fedmri-search`` instead: a federated search with a finished run's model. ``fedmri simulate`` builds its own ServerApp around a
config object with :func:`make_server_app`.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedmri.errors import FedmriError


def run_pipeline(grid: Grid, fed: DictConfig, run_id: int | None = None) -> dict:
    """Run ``fed``'s pipeline; a failure is logged and recorded in the run folder's state.json, then raised."""
    from fedmri.server.pipeline import Pipeline
    from fedmri.server.rundir import RunDir, failure_cause

    try:
        results = Pipeline(fed).run_all(grid)
    except Exception as exc:
        cause = failure_cause(exc)
        try:
            RunDir(Path(fed.run_root) / fed.name).record_failure(exc, run_id)
        except OSError as io_error:  # the cause is still in the log
            log(ERROR, "fedmri: could not record the failure in the run folder: %s", io_error)
        log(ERROR, "fedmri: run %s failed: %s", fed.name, cause)
        raise
    log(INFO, "fedmri: run %s finished; results in %s", fed.name, fed.run_root)
    return results


def make_server_app(fed: DictConfig) -> ServerApp:
    """A ServerApp bound to a federation config object (simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_pipeline(grid, fed)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: a pipeline run, or a federated search (``fedmri-task``)."""
    from fedmri.protocol import SEARCH_TASK
    from fedmri.server.config import load_federation

    if context.run_config.get("fedmri-task") == SEARCH_TASK:
        run_search_task(grid, str(context.run_config.get("fedmri-search", "")))
        return
    text = context.run_config.get("fedmri-config")
    run_pipeline(grid, load_federation(text=str(text) if text else None), run_id=context.run_id)


def run_search_task(grid: Grid, spec: str) -> dict:
    """``fedmri search``: the JSON spec holds run_dir, text, top_k and split."""
    import json

    from fedmri.server.search import run_search

    try:
        job = json.loads(spec)
        return run_search(grid, job["run_dir"], str(job["text"]), int(job["top_k"]), split=str(job.get("split", "all")))
    except FedmriError as exc:
        log(ERROR, "fedmri: %s", exc)
        raise
