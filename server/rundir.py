"""The run folder ``runs/<name>/``: resolved config, metrics, status, plots, export.

Layout::

    federation.yaml      the resolved federation config
    config.yaml          the resolved encoder config (preset + overrides)
    metrics.jsonl        one line per site and round, plus one aggregated line
    state.json           what `fedmri status` shows: stage, round, sites, last metrics;
                         for a failed run also ``error`` (its cause, one line)
    results.json         the final evaluation, aggregated and per site
    plots/*.png          losses per stage, per site and aggregated
    ckpt/                checkpoints (server.checkpoint)
    encoder.safetensors  the exported encoder (fedmri.export)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmri.server.checkpoint import _write_text_atomic


def failure_cause(error: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RunDir:
    """Writes a run's folder; every file is replaced atomically or appended line by line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.path / "ckpt"
        self.metrics_path = self.path / "metrics.jsonl"

    def write_configs(self, fed: DictConfig, run_cfg: DictConfig) -> None:
        _write_text_atomic(self.path / "federation.yaml", OmegaConf.to_yaml(fed))
        _write_text_atomic(self.path / "config.yaml", OmegaConf.to_yaml(run_cfg))

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")

    def truncate_metrics_after(self, server_round: int) -> None:
        """Drop rows of rounds after ``server_round`` (written by a run killed before its checkpoint)."""
        if not self.metrics_path.is_file():
            return
        keep = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("server_round", 0) <= server_round]
        _write_text_atomic(self.metrics_path, "".join(line + "\n" for line in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_state(self, **fields: Any) -> None:
        fields["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_text_atomic(self.path / "state.json", json.dumps(fields, indent=1, sort_keys=True))

    def write_progress(self, doc: dict[str, Any]) -> None:
        """``round.json``: the round in progress, site by site (fedmri.server.watch)."""
        _write_text_atomic(self.path / "round.json", json.dumps(doc, indent=1, sort_keys=True))

    def read_state(self) -> dict[str, Any]:
        """state.json as last written; empty when there is none (or it is unreadable)."""
        try:
            value = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return value if isinstance(value, dict) else {}

    def record_failure(self, error: BaseException, run_id: int | str | None = None) -> str:
        """Mark the run failed in state.json, keeping its stage and round; returns the cause written.

        The cause is the error's type and first line, which `fedmri run` and
        `fedmri status` show; the traceback stays in the run's Flower log.
        """
        cause = failure_cause(error)
        state = self.read_state()
        state.pop("updated", None)
        state.update(status="failed", error=cause)
        if run_id is not None:
            state["run_id"] = str(run_id)
        self.write_state(**state)
        return cause

    def write_results(self, results: dict[str, Any]) -> None:
        _write_text_atomic(self.path / "results.json", json.dumps(results, indent=1, sort_keys=True))

    def plot(self) -> list[Path]:
        """One PNG per training stage: each loss per round, per site (thin) and aggregated (thick)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.read_metrics() if r.get("status") in ("ok", "aggregated")]
        by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_stage[r["stage"]].append(r)
        out_dir = self.path / "plots"
        out_dir.mkdir(exist_ok=True)
        written = []
        for stage, stage_rows in by_stage.items():
            losses = sorted({k for r in stage_rows for k in r if k.endswith("loss")})
            if not losses:
                continue
            fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.2), squeeze=False)
            for ax, loss in zip(axes[0], losses):
                series: dict[str, list[tuple[int, float]]] = defaultdict(list)
                for r in stage_rows:
                    if loss in r:
                        series[str(r["site"])].append((r["round"], r[loss]))
                for site, points in sorted(series.items()):
                    xs, ys = zip(*sorted(points))
                    agg = site == "all"
                    ax.plot(xs, ys, marker="o", lw=2.5 if agg else 1, color="black" if agg else None,
                            label="aggregated" if agg else f"site {site}")
                ax.set_title(f"{stage}: {loss}")
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{stage}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
        return written
