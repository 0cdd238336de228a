"""TensorBoard events of a run: the rows of metrics.jsonl, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmri.server.tracking import TensorBoardSink, read_rows


def _row(step: int, site: str, loss: float, **extra: object) -> dict:
    return {"stage": "pretrain", "round": step, "server_round": step, "time": 1.0, "node": 7, "site": site,
            "status": "ok", "loss": loss, "bytes-up": 1000 * step} | extra


def test_rows_come_back_per_site_with_status_and_reason(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    sink.add([_row(1, "site-01", 2.5), _row(1, "all", 2.0, sites=1)])
    sink.add([{"stage": "pretrain", "round": 2, "server_round": 2, "site": "site-01", "status": "declined",
               "reason": "privacy budget spent", "time": 2.0, "node": 7}, _row(2, "all", float("nan"))])
    sink.close()
    rows = read_rows(tmp_path)
    assert [(r["server_round"], r["site"]) for r in rows] == [(1, "all"), (1, "site-01"), (2, "all"), (2, "site-01")]
    assert rows[1]["loss"] == pytest.approx(2.5) and rows[1]["bytes-up"] == 1000 and "node" not in rows[1]
    assert rows[0]["sites"] == 1
    assert rows[3]["status"] == "declined" and rows[3]["reason"] == "privacy budget spent"
    assert "loss" not in rows[2]  # a NaN is not written: TensorBoard would draw it as a value


def test_a_resumed_run_hides_the_steps_after_its_checkpoint_and_a_new_run_starts_clean(tmp_path: Path) -> None:
    first = TensorBoardSink(tmp_path)
    first.add([_row(1, "all", 3.0)])
    first.add([_row(2, "all", 2.0)])
    first.add([_row(3, "all", 1.0)])  # written, then the coordinator died before round 3's checkpoint
    first.close()
    resumed = TensorBoardSink(tmp_path, resume_after=2)
    resumed.add([_row(3, "all", 1.5)])
    resumed.close()
    assert [(r["server_round"], r["loss"]) for r in read_rows(tmp_path)] == [(1, 3.0), (2, 2.0), (3, 1.5)]
    fresh = TensorBoardSink(tmp_path)
    fresh.add([_row(1, "site-02", 9.0)])
    fresh.close()
    assert [(r["site"], r["loss"]) for r in read_rows(tmp_path)] == [("site-02", 9.0)]
