"""TensorBoard events and MLflow runs of a run: the rows of metrics.jsonl, read back with their own readers."""

from __future__ import annotations

import json
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


def _log(sink, run: Path, rows: list[dict]) -> None:
    """As the recorder does: metrics.jsonl first, then the sink."""
    with (run / "metrics.jsonl").open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    sink.add(rows)


def test_a_resume_that_redoes_logged_rounds_gets_a_clean_mlflow_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from fedmri.server.tracking import MLflowSink, read_mlflow_rows

    uri = (tmp_path / "mlruns").as_uri()
    first = MLflowSink(tmp_path, "demo/t", {"a": 1}, uri)
    for step in (1, 2, 3):
        _log(first, tmp_path, [_row(step, "site-01", 10.0 + step), _row(step, "all", 20.0 + step)])
    old_id = first.run_id
    # Killed after logging round 3, before its checkpoint: the resume starts after round 2,
    # and the pipeline has cut metrics.jsonl back to rounds 1-2.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["server_round"] <= 2]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    resumed = MLflowSink(tmp_path, "demo/t", {"a": 1}, uri, resume_after=2)
    for step in (3, 4):  # round 3 again, with other numbers
        _log(resumed, tmp_path, [_row(step, "site-01", 30.0 + step), _row(step, "all", 40.0 + step)])
    resumed.finish()

    client, run_id, rows = read_mlflow_rows(tmp_path)
    assert run_id == resumed.run_id != old_id
    assert [(r["server_round"], r["site"], r["loss"]) for r in rows] == [
        (1, "all", 21.0), (1, "site-01", 11.0), (2, "all", 22.0), (2, "site-01", 12.0),
        (3, "all", 43.0), (3, "site-01", 33.0), (4, "all", 44.0), (4, "site-01", 34.0)]
    steps = [m.step for m in client.get_metric_history(run_id, "pretrain/site-01/loss")]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # each round once
    old = client.get_run(old_id)
    assert old.info.status == "KILLED" and old.data.tags["fedmri.superseded_by"] == run_id
    new = client.get_run(run_id)
    assert new.data.tags["fedmri.resumed_from"] == old_id and new.data.params["a"] == "1"


def test_a_resume_with_nothing_to_redo_continues_its_mlflow_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from fedmri.server.tracking import MLflowSink, read_mlflow_rows

    uri = (tmp_path / "mlruns").as_uri()
    first = MLflowSink(tmp_path, "demo/t", {}, uri)
    _log(first, tmp_path, [_row(1, "all", 1.0), _row(2, "all", 2.0)])
    resumed = MLflowSink(tmp_path, "demo/t", {}, uri, resume_after=2)
    _log(resumed, tmp_path, [_row(3, "all", 3.0)])
    _, run_id, rows = read_mlflow_rows(tmp_path)
    assert run_id == first.run_id == resumed.run_id
    assert [(r["server_round"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]
