"""Site-enforced privacy in a whole pipeline over the real ClientApp (issue 5 acceptance).

Three hospitals with different policies take part in one run:

- site-01 has an ε budget of 1, and the noise is picked so that one DP-SGD round
  costs it less and two cost more: it declines the second round and the run
  goes on with the other two;
- site-02 leaves align out of its policy.stages;
- site-03 requires DP, so it trains pretrain (private) and declines align (not).

Every decline reaches the coordinator with its reason, and no ledger ever
shows more than its site's budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedmri.client.privacy import PrivacyLedger
from fedmri.accounting import rdp_epsilon
from fedmri.data.dataset import SeriesDataset
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline

from helpers.local_grid import LocalGrid

STEPS, DELTA, BUDGET = 2, 1e-5, 1.0
Z = 1.5  # central site-level noise multiplier


def _site(tmp_path: Path, site: tuple, policy: dict) -> Path:
    name, site_file, catalog = site
    cfg = OmegaConf.load(site_file)
    cfg.policy = OmegaConf.merge(cfg.get("policy", {}), policy, {"dp": {"ledger": str(tmp_path / f"{name}.ledger")}})
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture(scope="module")
def privacy_run(tmp_path_factory: pytest.TempPathFactory, federation_sites: list, module_server_identity: None) -> dict:
    tmp = tmp_path_factory.mktemp("privacy-run")
    first = federation_sites[0]
    rate = min(1.0, 2 / len(SeriesDataset(first[2], "train")))  # batch_size 2 in the site files
    sigma = _noise_between_rounds(rate)
    one = rdp_epsilon([(sigma, rate, STEPS)], DELTA)
    budget = BUDGET
    files = [_site(tmp, first, {"dp": {"epsilon_total": budget}}),
             _site(tmp, federation_sites[1], {"stages": ["pretrain", "evaluate"]}),
             _site(tmp, federation_sites[2], {"dp": {"required": True}})]
    body = {"name": "private", "preset": "micro", "min_sites": 2, "run_root": str(tmp / "runs"),
            "export": False, "wait_for_sites_s": 5,
            "stages": [{"name": "pretrain", "rounds": 2, "local_steps": STEPS,
                        "dp": {"enabled": True, "noise_multiplier": sigma},
                        "site_dp": {"mode": "central", "noise_multiplier": Z, "clip_norm": 5.0, "delta": DELTA}},
                       {"name": "align", "rounds": 1, "local_steps": 2, "min_sites": 1},
                       {"name": "evaluate"}]}
    fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))
    pipeline = Pipeline(fed)
    pipeline.run_all(LocalGrid({101 + i: f for i, f in enumerate(files)}))
    return {"pipeline": pipeline, "files": files, "budget": budget, "one": one, "tmp": tmp,
            "rows": [json.loads(line) for line in (tmp / "runs" / "private" / "metrics.jsonl").read_text().splitlines()]}


def _noise_between_rounds(rate: float) -> float:
    """A noise multiplier whose first round stays under the budget by 3% and whose second passes it by 3%."""
    for sigma in [1.5 + 0.05 * i for i in range(60)]:
        one, two = (rdp_epsilon([(sigma, rate, STEPS)] * r, DELTA) for r in (1, 2))
        if one <= 0.97 * BUDGET and two >= 1.03 * BUDGET:
            return sigma
    raise AssertionError(f"no noise multiplier puts the budget between rounds 1 and 2 at q={rate}")


def _row(rows: list, site: str, stage: str, rnd: int) -> dict:
    return next(r for r in rows if (r["site"], r["stage"], r["round"]) == (site, stage, rnd))


@pytest.mark.slow
def test_a_site_declines_the_round_past_its_budget_and_the_run_goes_on(privacy_run: dict) -> None:
    rows, budget = privacy_run["rows"], privacy_run["budget"]
    first = _row(rows, "site-01", "pretrain", 1)
    assert first["status"] == "ok" and first["dp-epsilon-total"] == pytest.approx(privacy_run["one"], abs=1e-9)
    second = _row(rows, "site-01", "pretrain", 2)
    assert second["status"] == "declined" and second["reason"].startswith("privacy budget")
    assert "budget is 1 in total" in second["reason"]
    aggregated = _row(rows, "all", "pretrain", 2)
    assert aggregated["status"] == "aggregated" and aggregated["sites"] == 2
    for name in ("site-02", "site-03"):
        assert _row(rows, name, "pretrain", 2)["status"] == "ok"
    with PrivacyLedger(privacy_run["tmp"] / "site-01.ledger", create=False) as ledger:
        entries = ledger.entries()
    assert [e.round for e in entries] == [1] and max(e.epsilon_total for e in entries) <= budget


@pytest.mark.slow
def test_ledgers_hold_opacus_epsilon_for_every_round_that_left(privacy_run: dict) -> None:
    rows = privacy_run["rows"]
    for name in ("site-02", "site-03"):
        with PrivacyLedger(privacy_run["tmp"] / f"{name}.ledger", create=False) as ledger:
            entries = ledger.entries()
        assert [(e.stage, e.round) for e in entries] == [("pretrain", 1), ("pretrain", 2)]
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        assert entries[-1].epsilon_total == pytest.approx(rdp_epsilon(history, DELTA), abs=1e-6)
        assert _row(rows, name, "pretrain", 2)["dp-epsilon-run"] == pytest.approx(entries[-1].epsilon_run)


@pytest.mark.slow
def test_policy_declines_reach_the_coordinator_with_their_reasons(privacy_run: dict) -> None:
    rows = privacy_run["rows"]
    assert "not in this site's policy.stages" in _row(rows, "site-02", "align", 1)["reason"]
    assert "requires differential privacy" in _row(rows, "site-03", "align", 1)["reason"]
    assert _row(rows, "site-01", "align", 1)["status"] == "ok"
    history = privacy_run["pipeline"].history
    align = next(h for h in history if h["stage"] == "align")
    assert set(align["declined"]) == {"site-02", "site-03"}


@pytest.mark.slow
def test_central_site_level_epsilon_is_accounted_and_reported(privacy_run: dict) -> None:
    rows = privacy_run["rows"]
    for rnd in (1, 2):
        expected = rdp_epsilon([(Z, 1.0, 1)] * rnd, DELTA)
        assert _row(rows, "all", "pretrain", rnd)["site-dp-epsilon"] == pytest.approx(expected, rel=1e-9)
    run = privacy_run["tmp"] / "runs" / "private"
    summary = json.loads((run / "privacy.json").read_text())
    assert summary["central"]["pretrain"]["epsilon"] == pytest.approx(rdp_epsilon([(Z, 1.0, 1)] * 2, DELTA))
    assert summary["sites"]["site-01"]["declined_for_budget"]
    assert "site-01" in (run / "privacy.md").read_text() and (run / "plots" / "privacy.png").stat().st_size > 1000


@pytest.mark.slow
def test_local_site_level_dp_is_recorded_in_the_sites_ledger(tmp_path: Path, federation_sites: list,
                                                              module_server_identity: None) -> None:
    files = [_site(tmp_path, site, {"dp": {"required": True}}) for site in federation_sites[:2]]
    body = {"name": "local", "preset": "micro", "min_sites": 2, "run_root": str(tmp_path / "runs"),
            "export": True, "wait_for_sites_s": 5,
            "stages": [{"name": "pretrain", "rounds": 1, "local_steps": 1,
                        "site_dp": {"mode": "local", "noise_multiplier": 2.0, "clip_norm": 1.0}}]}
    pipeline = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))))
    pipeline.run_all(LocalGrid({101 + i: f for i, f in enumerate(files)}))
    for name, *_ in federation_sites[:2]:
        with PrivacyLedger(tmp_path / f"{name}.ledger", create=False) as ledger:
            (entry,) = ledger.entries()
        # One Gaussian release of the clipped update: sensitivity 2C for one sample, so z/2 is accounted.
        assert (entry.stage, entry.noise_multiplier, entry.sample_rate, entry.steps) == ("pretrain:site-level", 1.0, 1.0, 1)
        assert entry.epsilon_total == pytest.approx(rdp_epsilon([(1.0, 1.0, 1)], DELTA), abs=1e-6)
    card = json.loads((tmp_path / "runs" / "local" / "encoder" / "config.json").read_text())  # the model card
    assert set(card["extra"]["privacy"]["sites"]) == {"site-01", "site-02"}
