"""A run's rows in TensorBoard and MLflow: the same rows as ``metrics.jsonl``.

:class:`fedmri.server.recorder.Recorder` decides what a round's rows are and
hands the same list to ``metrics.jsonl`` and to every sink here, so no sink
has an opinion of its own about a round.

Layout (``<run>/tensorboard/``)::

    all/        the aggregated row of each round (site "all")
    site-01/    that site's rows, under its pseudonymous name
    ...

Each row becomes, at step ``server_round`` (the run's global round, so the
stages follow each other on one axis):

- a scalar ``<stage>/<key>`` for each numeric field (losses, metrics, wall
  time, bytes, ε), except the bookkeeping ``round``, ``server_round``, ``node``
  and ``time``;
- a text ``<stage>/status`` with the row's status, and ``: reason`` when the
  site declined, failed or was rejected.

TensorBoard overlays the site folders on one chart per tag, which is the
comparison a coordinator wants; pointed at ``runs/``, it lists every run's
folders side by side. :func:`read_rows` reads the folders back with
TensorBoard's own reader (tests, and anyone checking a run).

A resumed run drops the rows after its checkpoint from ``metrics.jsonl``; here
the writers open with ``purge_step`` so TensorBoard hides the same steps.

MLflow (``federation.tracking.mlflow``, off by default; ``pip install
'fedmri[mlflow]'``): one MLflow run per fedmri run, in the experiment named by
the run name's first part, so a simulation's federated, local, central and
random-init runs sit side by side under one experiment. Its params are the
resolved federation and encoder configs (flattened keys), its metrics the
rows (``<stage>/<metric>`` for the aggregate, ``<stage>/<site>/<metric>`` per
site, step = global round), its artifacts at the end ``privacy.md``,
``results.json`` and the exported model card. The default URI is a file store
beside the run folders (``<run_root>/mlruns``): ``mlflow ui --backend-store-uri
runs/mlruns``. A resumed run continues its MLflow run (``mlflow.json`` in the
run folder keeps its id) when that run holds no round after the checkpoint.
Otherwise (the coordinator died after logging a round and before its checkpoint)
MLflow, which cannot delete metrics, would show the redone rounds twice: a new
MLflow run then takes over, with the kept rows of ``metrics.jsonl`` logged again,
tagged ``fedmri.resumed_from``; the old one ends ``KILLED``, tagged
``fedmri.superseded_by``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fedmri.errors import ConfigError
from fedmri.server.rundir import RunDir

FOLDER = "tensorboard"
# Row fields that say where a row belongs rather than what the round measured.
BOOKKEEPING = ("round", "server_round", "node", "time", "site", "stage", "status", "reason")


def scalar_fields(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numeric fields, which every tracker records (booleans, bookkeeping, NaN and inf left
    out: a tracker would draw a NaN as a value)."""
    return {k: float(v) for k, v in row.items()
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardSink:
    """Writes rows as TensorBoard events under ``<run>/tensorboard/<site>/``.

    Args:
        run_path: The run folder.
        resume_after: The last global round a resumed run keeps; later steps are purged.
            None: a fresh run, whose old event files are removed first.
    """

    def __init__(self, run_path: Path, resume_after: int | None = None) -> None:
        self.folder = Path(run_path) / FOLDER
        if resume_after is None and self.folder.exists():
            shutil.rmtree(self.folder)
        self.purge_step = None if resume_after is None else resume_after + 1
        self.writers: dict[str, Any] = {}

    def _writer(self, site: str) -> Any:
        if site not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[site] = SummaryWriter(str(self.folder / site), purge_step=self.purge_step, flush_secs=10)
        return self.writers[site]

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Write a round's rows and flush, so a live TensorBoard shows the round now."""
        for row in rows:
            writer = self._writer(str(row["site"]))
            step, stage = int(row["server_round"]), str(row["stage"])
            for key, value in scalar_fields(row).items():
                writer.add_scalar(f"{stage}/{key}", value, step)
            status = str(row.get("status", ""))
            text = f"{status}: {row['reason']}" if row.get("reason") else status
            writer.add_text(f"{stage}/status", text, step)
        for writer in self.writers.values():
            writer.flush()

    def finish(self) -> None:
        """Nothing to add at the end of a run: :meth:`close`, which the recorder calls next, flushes."""

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def read_rows(run_path: Path) -> list[dict[str, Any]]:
    """The rows back from ``<run>/tensorboard`` with TensorBoard's reader, as ``metrics.jsonl`` has them.

    Each row holds ``site``, ``stage``, ``server_round``, ``status``, ``reason`` (when
    there was one) and its scalars, sorted by (server_round, site).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for folder in sorted(p for p in (Path(run_path) / FOLDER).iterdir() if p.is_dir()):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        site = folder.name
        for tag in acc.Tags().get("tensors", []):  # text summaries are stored as string tensors
            stage, _, key = tag.partition("/")
            if not key.startswith("status"):  # e.g. a simulation's report: no row
                continue
            for event in acc.Tensors(tag):
                text = event.tensor_proto.string_val[0].decode()
                status, _, reason = text.partition(": ")
                row = rows.setdefault((event.step, site, stage),
                                      {"site": site, "stage": stage, "server_round": event.step})
                row["status"] = status
                if reason:
                    row["reason"] = reason
        for tag in acc.Tags().get("scalars", []):
            stage, _, key = tag.partition("/")
            for event in acc.Scalars(tag):
                row = rows.setdefault((event.step, site, stage),
                                      {"site": site, "stage": stage, "server_round": event.step})
                row[key] = event.value
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2]))]


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out |= _flatten(v, f"{prefix}{v.get('name', i)}.")
        return out
    return {prefix.rstrip("."): str(value)[:500]}  # MLflow's limit on a param value


def mlflow_metric_key(row: dict[str, Any], key: str) -> str:
    """``<stage>/<metric>`` for the aggregated row, ``<stage>/<site>/<metric>`` for a site's."""
    site = str(row["site"])
    return f"{row['stage']}/{key}" if site == "all" else f"{row['stage']}/{site}/{key}"


def mlflow_client(uri: str) -> Any:
    """An MLflow client for ``uri``; a file store is allowed (MLflow 3 asks for the opt-in)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("federation.tracking.mlflow is on but MLflow is not installed: pip install "
                          "'fedmri[mlflow]' (or mlflow-skinny), or set tracking.mlflow.enabled=false") from None
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def default_mlflow_uri(run_path: Path, run_name: str) -> str:
    """A file store beside the run folders: ``<run_root>/mlruns``."""
    root = Path(run_path)
    for _ in range(len(Path(run_name).parts)):
        root = root.parent
    return (root / "mlruns").resolve().as_uri()


class MLflowSink:
    """Writes rows as MLflow metrics of one MLflow run; params at the start, artifacts at the end.

    Args:
        run_path: The run folder.
        run_name: The fedmri run name (``demo/federated``): experiment ``demo``, run ``federated``.
        params: The resolved configs, nested (flattened into params).
        uri: Tracking URI; None: :func:`default_mlflow_uri`.
        experiment: Experiment name; None: the run name's first part.
        resume_after: For a resumed run, the last global round it keeps: the MLflow run recorded
            in ``<run>/mlflow.json`` goes on, unless it holds a later round; then a new MLflow run
            replaces it (see the module's docstring). None: a new run.
    """

    def __init__(self, run_path: Path, run_name: str, params: dict[str, Any], uri: str | None = None,
                 experiment: str | None = None, resume_after: int | None = None) -> None:
        self.run_path = Path(run_path)
        self.uri = uri or default_mlflow_uri(self.run_path, run_name)
        self.client = mlflow_client(self.uri)
        record = self.run_path / "mlflow.json"
        previous = json.loads(record.read_text()) if resume_after is not None and record.is_file() else None
        superseded = None
        if previous and previous.get("uri") == self.uri:
            if self._last_step(previous["run_id"]) <= resume_after:
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            superseded = previous["run_id"]
        parts = Path(run_name).parts
        name = experiment or parts[0]
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name="/".join(parts[1:]) or parts[0])
        self.run_id = run.info.run_id
        record.write_text(json.dumps({"uri": self.uri, "experiment": name, "run_id": self.run_id}))
        from mlflow.entities import Param

        flat = sorted(_flatten(params).items())
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat[i:i + 100]])
        if superseded is not None:
            self.client.set_tag(self.run_id, "fedmri.resumed_from", superseded)
            self.client.set_tag(superseded, "fedmri.superseded_by", self.run_id)
            self.client.set_terminated(superseded, status="KILLED")
            self.add([row for row in RunDir(self.run_path).read_metrics() if int(row["server_round"]) <= resume_after])

    def _last_step(self, run_id: str) -> int:
        """The latest global round any metric of MLflow run ``run_id`` was logged at (0 if none)."""
        keys = self.client.get_run(run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(run_id, key)), default=0)

    def add(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for row in rows:
            stamp = int(float(row.get("time", 0.0)) * 1000)
            metrics += [Metric(mlflow_metric_key(row, key), value, stamp, int(row["server_round"]))
                        for key, value in scalar_fields(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self) -> None:
        """Log the run's reports as artifacts and mark the MLflow run finished."""
        for name in ("privacy.md", "results.json", "encoder/config.json"):
            path = self.run_path / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), str(Path(name).parent) if "/" in name else None)
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        """Nothing to flush: every batch is written when it is logged."""


def read_mlflow_rows(run_path: Path) -> tuple[Any, str, list[dict[str, Any]]]:
    """(client, run id, rows) of the run's MLflow run, the rows rebuilt from the metric histories.

    Rows hold ``site``, ``stage``, ``server_round`` and the metrics, sorted as :func:`read_rows`.
    """
    record = json.loads((Path(run_path) / "mlflow.json").read_text())
    client = mlflow_client(record["uri"])
    run = client.get_run(record["run_id"])
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for key in run.data.metrics:
        parts = key.split("/")
        stage, site, metric = (parts[0], "all", parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])
        for m in client.get_metric_history(record["run_id"], key):
            row = rows.setdefault((m.step, site, stage), {"site": site, "stage": stage, "server_round": m.step})
            row[metric] = m.value
    return client, record["run_id"], [rows[k] for k in sorted(rows)]
