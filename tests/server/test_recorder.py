"""One round, one shape: the rows and history entry a round's outcome becomes."""

from __future__ import annotations

import json
from pathlib import Path

from fedmri.server.recorder import Recorder, RoundOutcome
from fedmri.server.rundir import RunDir


def test_a_round_becomes_one_row_per_site_asked_and_one_aggregate(tmp_path: Path) -> None:
    out = RoundOutcome("pretrain", 2, 5, sampled=[1, 2, 3, 4], accepted=[1, 4], aggregated={"loss": 1.5, "num-examples": 8.0}, updated=True,
                       problems=[(2, "declined", "budget"), (3, "rejected", "norm")],
                       replies=[(4, {"loss": 2.0, "num-examples": 4.0, "wall-time-s": 3.0}, 100),
                                (1, {"loss": 1.0, "num-examples": 4.0, "wall-time-s": 1.0}, 100)],
                       bytes_down=50, wall_s=5.0, replied_at=1.0)
    recorder = Recorder(RunDir(tmp_path / "run"), lambda node: f"site-{node}")
    recorder.record(out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["site"], r["status"]) for r in rows] == [("site-2", "declined"), ("site-3", "rejected"),
                                                        ("site-4", "ok"), ("site-1", "ok"), ("all", "aggregated")]
    assert rows[2]["loss"] == 2.0 and rows[2]["bytes-up"] == 100 and rows[2]["bytes-down"] == 50
    agg = rows[-1]
    assert agg["loss"] == 1.5 and agg["sites"] == 2 and agg["bytes-down"] == 200
    assert agg["wall-time-s"] == 5.0 and agg["overhead-s"] == 2.0  # the round's wall less the slowest site
    assert recorder.history == [{"stage": "pretrain", "round": 2, "server_round": 5, "sites": ["site-1", "site-4"],
                                 "declined": {"site-2": "budget"}, "failed": {}, "rejected": {"site-3": "norm"},
                                 "metrics": {"loss": 1.5, "num-examples": 8.0}}]


def test_an_evaluation_with_metrics_counts_as_aggregated_and_a_training_round_without_update_is_skipped(
        tmp_path: Path) -> None:
    recorder = Recorder(RunDir(tmp_path / "run"), str)
    evaluated = RoundOutcome("evaluate", 1, 1, sampled=[1], accepted=[1], aggregated={"val_loss": 1.0})
    skipped = RoundOutcome("align", 1, 2, sampled=[1, 2])
    assert recorder.rows(evaluated)[-1]["status"] == "aggregated"
    assert recorder.rows(skipped)[-1]["status"] == "skipped"
    assert recorder.evaluations() == []
