"""`fedmri status --watch`: the live view of a round, read from the run folder while the round runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Message
from omegaconf import OmegaConf

from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline
from fedmri.server.watch import RoundProgress, watch_lines

from helpers.local_grid import LocalGrid


def test_the_view_shows_replied_pending_and_declined_sites_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "federation.yaml").write_text("stages: [{name: pretrain, rounds: 2}]\n")
    docs: list[dict] = []
    progress = RoundProgress(lambda d: (tmp_path / "round.json").write_text(__import__("json").dumps(d)) or
                             docs.append(d), "pretrain", 1, 2, 1, ["site-01", "site-02", "site-03"])
    progress.mark("site-01", "replied")
    progress.mark("site-03", "declined", "privacy budget spent")
    lines = watch_lines(tmp_path, now=progress.doc["started"] + 65)
    text = "\n".join(lines)
    assert "pretrain round 1/2 (global 1), running for 65 s" in text
    assert [line.split()[:2] for line in lines[2:]] == [["site-01", "replied"], ["site-02", "pending"],
                                                        ["site-03", "declined"]]
    assert "pending for 65 s" in text and "declined after 0 s: privacy budget spent" in text


@pytest.mark.slow
def test_watch_shows_a_site_that_has_not_replied_yet_as_pending(tmp_path: Path, federation_sites: list) -> None:
    body = {"name": "t", "preset": "micro", "min_sites": 2, "run_root": str(tmp_path / "runs"), "export": False,
            "wait_for_sites_s": 5, "stages": [{"name": "pretrain", "rounds": 2, "local_steps": 1}]}
    fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))
    run = tmp_path / "runs" / "t"
    seen: list[str] = []

    def look_before_site_3_replies(node: int, reply: Message) -> Message:
        if node == 103 and reply.metadata.message_type == "train" and not seen:  # mid-round: sites 1 and 2 have replied, site 3's reply is not in
            cli = subprocess.run([sys.executable, "-c", "from fedmri.cli import main; main()", "status", "--watch",
                                  "--run", str(run), "--frames", "1"], capture_output=True, text=True, timeout=120)
            assert cli.returncode == 0, cli.stderr
            seen.append(cli.stdout)
        return reply

    grid = LocalGrid({101 + i: f for i, (_, f, _) in enumerate(federation_sites)}, look_before_site_3_replies)
    Pipeline(fed).run_all(grid)
    view = seen[0]
    assert "running" in view.splitlines()[0] and "pretrain round 1/2 (global 1), running for" in view
    rows = {line.split()[0]: line for line in view.splitlines()[2:]}
    assert "replied" in rows["site-01"] and "replied" in rows["site-02"], view
    assert "pending for" in rows["site-03"], view
    # After the run, the last round is shown done, with every site's reply.
    final = "\n".join(watch_lines(run))
    assert "finished" in final and "pretrain round 2/2 (global 2), done" in final
    assert final.count("replied after") == 3
