"""A run's rows in TensorBoard: the same rows as ``metrics.jsonl``, one event folder per site.

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
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

FOLDER = "tensorboard"
# Row fields that say where a row belongs rather than what the round measured.
BOOKKEEPING = ("round", "server_round", "node", "time", "site", "stage", "status", "reason")


def scalar_fields(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric fields that become scalars (booleans and bookkeeping left out)."""
    return {k: float(v) for k, v in row.items()
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}


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
                if math.isfinite(value):
                    writer.add_scalar(f"{stage}/{key}", value, step)
            status = str(row.get("status", ""))
            text = f"{status}: {row['reason']}" if row.get("reason") else status
            writer.add_text(f"{stage}/status", text, step)
        for writer in self.writers.values():
            writer.flush()

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
            if not key.startswith("status"):
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
