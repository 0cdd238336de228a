"""The opt-in timing trace: nothing without FEDMRI_TRACE, one JSON line per event with it."""

from __future__ import annotations

import json
import time

from fedmri import trace


def test_events_go_to_the_named_file_only(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    trace.event("nothing")
    assert not path.exists() and not trace.enabled()
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    trace.event("push-done", messages=2)
    trace.event("reply", node=7)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in rows] == ["push-done", "reply"]
    assert rows[0]["messages"] == 2 and rows[1]["node"] == 7 and rows[0]["t"] <= rows[1]["t"]


def test_process_start_is_in_the_past_and_recent():
    started = trace.process_started()
    assert time.time() - 24 * 3600 < started <= time.time() + 1
