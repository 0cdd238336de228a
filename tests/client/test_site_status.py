"""`fedmri client status`: the site's own record of its rounds, its privacy totals and its catalog, from local files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import identity

from fedmri.client.app import app
from fedmri.client.trainers import parse_run_config
from fedmri.wire import select, stage_groups, to_record


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from fedmri.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_status_shows_the_rounds_handled_with_results_reasons_budget_and_counts(site_file, initial, request_values,
                                                                               tmp_path: Path, one_thread) -> None:
    # Without the journal other tests wrote through the shared fixture site.
    shutil.copytree(site_file.parent / "catalog", tmp_path / "catalog", ignore=shutil.ignore_patterns("rounds.jsonl*"))
    site = tmp_path / "site.yaml"
    site.write_text(site_file.read_text().replace("max_local_steps: 20\n", "max_local_steps: 20\n  dp:\n"
                                                  "    required: true\n    epsilon_total: 8.0\n"))
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})

    def send(values: dict) -> Message:
        run_cfg = parse_run_config(values["fedmri-config"])
        down = select(initial, stage_groups(values["stage"], run_cfg).down)
        kind = MessageType.EVALUATE if values["stage"] == "evaluate" else MessageType.TRAIN
        with identity.server_identity():
            msg = Message(RecordDict({"arrays": to_record(down), "config": ConfigRecord(values)}), dst_node_id=7,
                          message_type=kind)
        return app(msg, context)

    send(request_values("evaluate", run_name="study-1"))
    declined = send(request_values("pretrain", run_name="study-1", local_steps=1))  # no DP: the policy says no
    reason = dict(declined.content["status"])["reason"]

    out = _cli("client", "status", "--site", str(site), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [(r["run"], r["stage"], r["result"]) for r in doc["rounds"]] == [("study-1", "evaluate", "ok"),
                                                                           ("study-1", "pretrain", "declined")]
    assert doc["rounds"][1]["reason"] == reason and doc["rounds"][0]["examples"] == 2
    assert doc["results"] == {"ok": 1, "declined": 1, "failed": 0}
    assert doc["privacy"]["budget"] == 8.0 and doc["privacy"]["remaining"] == 8.0 and doc["privacy"]["rounds"] == 0
    assert doc["catalog"]["n_series"] == 12 and doc["catalog"]["by_split"] == {"train": 8, "val": 2, "test": 2}
    text = _cli("client", "status", "--site", str(site)).stdout
    assert "2 round(s) handled (1 ok, 1 declined, 0 failed)" in text and "declined" in text
    assert "budget ε 8, 8.0000 left" in text and "12 series of 6 patients" in text


def test_the_journal_stays_bounded_and_keeps_the_latest_rounds_in_order(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from fedmri.client import journal

    monkeypatch.setattr(journal, "MAX_BYTES", 2000)
    site = SimpleNamespace(catalog=str(tmp_path))
    for i in range(200):
        journal.note_round(site, SimpleNamespace(run_name="r", stage="pretrain", round=i), "ok", None, 0.1)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rounds.jsonl", "rounds.jsonl.1"]
    assert all((tmp_path / f).stat().st_size < 2000 + 200 for f in files)  # one line past the limit at most
    rounds = [e["round"] for e in journal.read_journal(site)]
    assert rounds == list(range(rounds[0], 200)) and 0 < rounds[0] < 200 - 10  # the latest, oldest first
