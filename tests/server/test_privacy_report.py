"""The privacy report of a run, from hand-written metrics.jsonl rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmri.errors import FedmriError
from fedmri.server.privacy_report import model_card_privacy, privacy_summary, status_lines, write_privacy_report

DELTA = 1e-5
BUDGET_REASON = "privacy budget: this pretrain round would take the site to ε 9.1 in total"
# (stage, round, server_round) -> site -> dp-epsilon-run after the round; None: declined for budget.
EPSILON = {
    ("pretrain", 1, 1): {"site-01": 1.0, "site-02": 1.5, "site-03": 0.8},
    ("pretrain", 2, 2): {"site-01": 1.9, "site-02": None, "site-03": 1.2},
    ("align", 1, 3): {"site-01": 2.31, "site-02": 2.0, "site-03": 1.6},
}
CENTRAL = {1: 0.5, 2: 0.8, 3: 1.2}  # server_round -> the coordinator's site-level ε


def _ok(stage: str, rnd: int, server_round: int, site: str, eps: float) -> dict[str, Any]:
    return {"stage": stage, "round": rnd, "server_round": server_round, "time": 0.0, "site": site, "node": 1,
            "status": "ok", "dino_loss": 3.0, "dp-epsilon-run": eps, "dp-epsilon-total": eps + 4.0,
            "dp-delta": DELTA, "dp-noise-multiplier": 1.1 if stage == "pretrain" else 0.9,
            "dp-sample-rate": 0.01, "dp-steps": 20.0, "dp-max-grad-norm": 1.0}


def dp_rows() -> list[dict[str, Any]]:
    """3 sites, pretrain x2 + align x1 + evaluate, site-02 declined for budget in round 2, central ε."""
    rows = []
    for (stage, rnd, server_round), sites in EPSILON.items():
        base = {"stage": stage, "round": rnd, "server_round": server_round, "time": 0.0}
        for site, eps in sites.items():
            rows.append(_ok(stage, rnd, server_round, site, eps) if eps is not None else
                        base | {"site": site, "node": 2, "status": "declined", "reason": BUDGET_REASON})
        # The aggregated row also holds the sites' weighted means of dp-*: not a site's ε.
        rows.append(base | {"site": "all", "status": "aggregated", "dp-epsilon-run": 99.0,
                            "site-dp-epsilon": CENTRAL[server_round], "site-dp-delta": DELTA})
    rows.append({"stage": "evaluate", "round": 1, "server_round": 4, "site": "site-04", "status": "ok", "auc": 0.8})
    return rows[::-1]  # order does not matter


def no_dp_rows() -> list[dict[str, Any]]:
    return [{"stage": "pretrain", "round": 1, "server_round": 1, "site": site, "status": "ok", "dino_loss": 3.0}
            for site in ("site-01", "site-02")]


def test_summary_per_site_and_stage() -> None:
    s = privacy_summary(dp_rows())
    assert s["dp_used"] and s["stages"] == ["pretrain", "align"]
    assert list(s["sites"]) == ["site-01", "site-02", "site-03"]  # not the evaluate-only site-04
    one = s["sites"]["site-01"]
    assert one["epsilon_run"] == 2.31 and one["epsilon_total"] == pytest.approx(6.31) and one["delta"] == DELTA
    assert one["mechanisms"] == ["dp-sgd"] and one["declined_for_budget"] == []
    pre, align = one["stages"]["pretrain"], one["stages"]["align"]
    assert (pre["rounds_dp"], pre["epsilon_run"], pre["noise_multiplier"], pre["sample_rate"]) == (2, 1.9, 1.1, 0.01)
    assert (align["rounds_dp"], align["epsilon_run"], align["noise_multiplier"]) == (1, 2.31, 0.9)
    two = s["sites"]["site-02"]
    assert two["stages"]["pretrain"]["rounds_dp"] == 1 and two["stages"]["pretrain"]["epsilon_run"] == 1.5
    assert two["epsilon_run"] == 2.0
    assert two["declined_for_budget"] == [{"stage": "pretrain", "round": 2, "server_round": 2,
                                           "reason": BUDGET_REASON}]
    assert {k: c["epsilon"] for k, c in s["central"].items()} == {"pretrain": 0.8, "align": 1.2}
    assert s["central"]["pretrain"]["rounds"] == 2
    assert (s["central_epsilon"], s["central_delta"]) == (1.2, DELTA)


def test_an_update_without_dp_has_no_bound() -> None:
    rows = [r for r in dp_rows() if not (r["site"] == "site-03" and r["stage"] == "align")]
    rows.append({"stage": "align", "round": 1, "server_round": 3, "site": "site-03", "status": "ok"})
    for r in rows:
        if r["site"] == "site-01" and r["stage"] == "align":
            r |= {"site-dp-noise-multiplier": 0.7, "site-dp-clip-norm": 5.0}
    rows.append({"stage": "pretrain", "round": 1, "server_round": 1, "site": "site-05", "status": "declined",
                 "reason": "privacy budget: spent"})
    s = privacy_summary(rows)
    three = s["sites"]["site-03"]
    assert three["stages"]["pretrain"]["epsilon_run"] == 1.2 and three["stages"]["align"]["epsilon_run"] is None
    assert three["epsilon_run"] is None and three["unprotected_rounds"] == 1
    assert s["sites"]["site-05"]["epsilon_run"] == 0.0  # declined everything: released nothing
    assert any("∞" in line and "site-03" in line for line in status_lines(s))
    one = s["sites"]["site-01"]
    assert one["mechanisms"] == ["dp-sgd", "local-site-dp"] and one["stages"]["align"]["site_clip_norm"] == 5.0
    card = model_card_privacy(s)
    assert "local" in card["guarantee"] and "no sample-level guarantee for site-03" in card["guarantee"]


def test_report_files(tmp_path: Path) -> None:
    written = write_privacy_report(tmp_path, dp_rows())
    assert sorted(p.name for p in written) == ["privacy.json", "privacy.md", "privacy.png"]
    md = (tmp_path / "privacy.md").read_text()
    assert "| site-01 | pretrain | 1.9 | 1e-05 | 1.1 | 0.01 | 20 | 1 | – | 2 / 2 |" in md
    assert "| site-01 | align | 2.31 | 1e-05 | 0.9 |" in md
    assert "| site-02 | pretrain | 1.5 |" in md and "| align | 1.2 | 1e-05 | 1 |" in md
    assert "site-02: pretrain round 2 (global 2): privacy budget" in md
    png = tmp_path / "plots" / "privacy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert json.loads((tmp_path / "privacy.json").read_text()) == privacy_summary(dp_rows())


def test_model_card_part_is_strict_json() -> None:
    card = model_card_privacy(privacy_summary(dp_rows()))
    back = json.loads(json.dumps(card, allow_nan=False))
    assert back["dp"] is True and back["central"] == {"epsilon": 1.2, "delta": DELTA}
    assert {k: v["epsilon"] for k, v in back["sites"].items()} == {"site-01": 2.31, "site-02": 2.0, "site-03": 1.6}
    assert back["sites"]["site-01"]["stages"]["pretrain"]["noise_multiplier"] == 1.1
    assert "sample-level" in back["guarantee"] and "central" in back["guarantee"]


def test_no_dp(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text("{}")  # a previous run of the same name
    s = privacy_summary(no_dp_rows())
    assert not s["dp_used"] and s["sites"]["site-01"]["epsilon_run"] is None and s["central_epsilon"] is None
    assert write_privacy_report(tmp_path, no_dp_rows()) == [tmp_path / "privacy.md"]
    assert "no differential privacy in this run" in (tmp_path / "privacy.md").read_text().lower()
    assert not (tmp_path / "privacy.json").exists() and not (tmp_path / "plots" / "privacy.png").exists()
    card = model_card_privacy(s)
    assert card["dp"] is False and "no differential privacy" in card["guarantee"]
    assert json.loads(json.dumps(card, allow_nan=False))["sites"]["site-02"]["epsilon"] is None
    assert status_lines(s)[0] == "ε spent: site-01 ∞ (no DP) (pretrain ∞)"


def test_status_shows_privacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from fedmri.cli import run_cmd

    def unreachable(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise FedmriError("SuperLink unavailable")

    monkeypatch.setattr("fedmri.server.daemon.read_connection", lambda home, name: ("fedmri", {"address": "x:1"}))
    monkeypatch.setattr("fedmri.flower_cli.flwr_json", unreachable)
    run = tmp_path / "demo"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"stage": None, "status": "finished"}))
    write_privacy_report(run, dp_rows())

    report = run_cmd.collect_status(None, None, tmp_path)
    assert report["privacy"][str(run)]["sites"]["site-01"]["epsilon_run"] == 2.31
    run_cmd.status_command(federation=None, state=None, runs=tmp_path, as_json=False)
    out = capsys.readouterr().out
    assert "ε spent: site-01 2.31 (pretrain 1.9, align 2.31) at δ 1e-05, per series" in out
    assert "site-02 2 (pretrain 1.5, align 2) at δ 1e-05, per series; 1 round(s) declined for budget" in out
    assert "central site-level ε 1.2 at δ 1e-05" in out


def test_heads_rounds_count_their_privacy_spend() -> None:
    """The heads stage sends heads trained on the site's labels: its DP rounds add to the run's ε."""
    rows = dp_rows() + [_ok("heads", 1, 4, "site-01", 2.9),
                        {"stage": "heads", "round": 1, "server_round": 4, "site": "site-02", "status": "ok"}]
    s = privacy_summary(rows)
    assert s["stages"] == ["pretrain", "align", "heads"]
    one = s["sites"]["site-01"]
    assert one["epsilon_run"] == 2.9 and one["stages"]["heads"]["rounds_dp"] == 1
    assert s["sites"]["site-02"]["stages"]["heads"]["rounds_dp"] == 0  # an update without DP, reported as such


def test_the_report_states_the_private_unit(tmp_path: Path) -> None:
    """dp-unit-patient 1.0: ε per patient; 0.0 or absent (an older site): per series, per pair in alignment."""
    rows = dp_rows()
    for r in rows:
        if r["site"] in ("site-01", "site-02") and r["status"] == "ok":
            r["dp-unit-patient"] = 1.0
    s = privacy_summary(rows)
    assert [s["sites"][name]["unit"] for name in ("site-01", "site-02", "site-03")] == ["patient", "patient", "series"]
    assert s["sites"]["site-01"]["stages"]["align"]["unit"] == "patient"
    card = model_card_privacy(s)
    assert "patient-level (ε, δ)-DP per patient at site-01, site-02" in card["guarantee"]
    assert "sample-level (ε, δ)-DP per series (per image-report pair in alignment) at site-03" in card["guarantee"]
    assert card["sites"]["site-01"]["unit"] == "patient" and card["sites"]["site-03"]["unit"] == "series"
    assert card["sites"]["site-01"]["stages"]["pretrain"]["unit"] == "patient"
    write_privacy_report(tmp_path, rows)
    md = (tmp_path / "privacy.md").read_text()
    assert "| site-01 | pretrain | 1.9 | 1e-05 | 1.1 | 0.01 | 20 | 1 | – | 2 / 2 | patient |" in md
    assert "| site-03 | align | 1.6 |" in md and "| 1 / 1 | series |" in md
    assert json.loads((tmp_path / "privacy.json").read_text())["sites"]["site-02"]["unit"] == "patient"
    assert any(line.startswith("ε spent: site-01 2.31") and line.endswith("per patient") for line in status_lines(s))
    everyone = [r | {"dp-unit-patient": 1.0} if r["status"] == "ok" else r for r in rows]
    assert model_card_privacy(privacy_summary(everyone))["guarantee"].startswith(
        "patient-level (ε, δ)-DP per patient at each site")


def test_distributed_site_dp_is_not_called_central_in_the_guarantee() -> None:
    from fedmri.server.privacy_report import guarantee

    central = guarantee(privacy_summary(dp_rows()))
    rows = [r | ({"site-dp-distributed": 1.0} if r.get("site") == "all" else {}) for r in dp_rows()]
    distributed = guarantee(privacy_summary(rows))
    assert "noised by the coordinator" in central and "distributed" not in central
    assert "noised by the sites in shares under secure aggregation" in distributed
    assert "trusts the coordinator" not in distributed
