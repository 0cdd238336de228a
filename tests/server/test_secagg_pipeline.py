"""Secure aggregation in the pipeline: 5 sites in process, the real ClientApp, masked updates only.

The aggregate equals plain FedAvg's within the stated quantisation bound, for pretrain
and heads; sites that drop out before or after sending leave a round that still
recovers the sum; what the coordinator receives from one site looks like uniform
noise (and the unmasked encoding does not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from omegaconf import OmegaConf
from scipy.stats import chisquare

from fedmri import wire
from fedmri.errors import ConfigError
from fedmri.protocol import SECAGG_UNMASK
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline

from helpers.local_grid import LocalGrid

NODES = (101, 102, 103, 104, 105)
SECURE = {"enabled": True, "clip_norm": 10.0, "max_weight": 100.0}


def _fed(tmp_path: Path, stage: dict, secure: bool, **extra: object) -> object:
    stage = stage | ({"secure_aggregation": SECURE} if secure else {})
    body = {"name": "t", "preset": "micro", "min_sites": 2, "run_root": str(tmp_path / "runs"),
            "stages": [stage], "export": False, "wait_for_sites_s": 5, "round_timeout_s": 5} | extra
    return load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))


def _grid(sites: list, tamper=None) -> LocalGrid:
    # Five nodes over the three hospitals: nodes 104 and 105 hold the data of 101 and 102.
    return LocalGrid({node: sites[i % len(sites)][1] for i, node in enumerate(NODES)}, tamper)


def _run(tmp_path: Path, sites: list, stage: dict, secure: bool, tamper=None, **extra: object) -> tuple:
    pipeline = Pipeline(_fed(tmp_path, stage, secure, **extra))
    grid = _grid(sites, tamper)
    pipeline.run_all(grid)
    return pipeline, grid


PRETRAIN = {"name": "pretrain", "rounds": 1, "local_steps": 1}


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory, federation_sites: list, module_server_identity: None) -> dict:
    """One plain and one secure pretrain round of all five sites, shared by the tests below."""
    root = tmp_path_factory.mktemp("secagg-five")
    plain, plain_grid = _run(root / "plain", federation_sites, PRETRAIN, secure=False)
    secure, grid = _run(root / "secure", federation_sites, PRETRAIN, secure=True)
    return {"plain": plain, "plain_grid": plain_grid, "secure": secure, "grid": grid}


def _fedavg(five: dict, nodes: set[int]) -> dict[str, torch.Tensor]:
    """FedAvg of the plain round's updates of ``nodes`` only (each site trains the same whatever the others do)."""
    replies = [r for r in five["plain_grid"].received if r.metadata.message_type == "train"
               and int(r.metadata.src_node_id) in nodes]
    assert len(replies) == len(nodes)
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    arrays = [wire.from_record(r.content["arrays"]) for r in replies]
    return {k: sum(w * a[k].double() for w, a in zip(weights, arrays, strict=True)) / sum(weights)
            for k in arrays[0]}


def _up(pipeline: Pipeline, stage: str) -> dict[str, torch.Tensor]:
    return wire.select(pipeline.state, wire.stage_groups(stage, pipeline.cfg).up)


def _close(plain: Pipeline | dict, secure: Pipeline, stage: str) -> float:
    """Largest coordinate difference of the stage's up groups, after checking it is within the bound."""
    bound = secure.outcomes[0].aggregated["secagg-quantisation-bound"]
    worst = 0.0
    a, b = (plain if isinstance(plain, dict) else _up(plain, stage)), _up(secure, stage)
    for key in a:
        diff = (a[key].double() - b[key].double()).abs()
        # float32 storage of either result adds its own rounding on top of the fixed-point bound.
        allowed = bound + 2 * torch.finfo(torch.float32).eps * a[key].double().abs()
        assert torch.all(diff <= allowed), (key, float(diff.max()), bound)
        worst = max(worst, float(diff.max()))
    return worst


def _drop(nodes: set[int], message_type: str):
    return lambda n, reply: None if n in nodes and reply.metadata.message_type == message_type else reply


@pytest.mark.slow
@pytest.mark.parametrize("stage", [PRETRAIN, {"name": "heads", "rounds": 1, "local_steps": 2}],
                         ids=["pretrain", "heads"])
def test_secure_aggregate_is_fedavg_within_the_quantisation_bound(tmp_path: Path, federation_sites: list,
                                                                  five: dict, stage: dict) -> None:
    if stage is PRETRAIN:
        plain, secure, grid = five["plain"], five["secure"], five["grid"]
    else:
        plain, _ = _run(tmp_path / "plain", federation_sites, stage, secure=False)
        secure, grid = _run(tmp_path / "secure", federation_sites, stage, secure=True)
    outcome = secure.outcomes[0]
    assert outcome.updated and outcome.accepted == list(NODES) and not outcome.problems
    assert outcome.aggregated["secagg-sites"] == 5
    moved = max(float((a.double() - b.double()).abs().max()) for a, b in
                zip(_up(plain, stage["name"]).values(), wire.select(wire.initial_state(plain.cfg),
                    wire.stage_groups(stage["name"], plain.cfg).up).values(), strict=True))
    worst = _close(plain, secure, stage["name"])
    assert worst < moved / 100  # the round moved the weights far more than secure aggregation's error
    # Every training reply the coordinator got is ring elements, not weights.
    train = [r for r in grid.received if r.metadata.message_type == "train"]
    assert len(train) == 5
    assert all(a.dtype == "uint32" for r in train for a in r.content["arrays"].values())


@pytest.mark.slow
def test_dropouts_before_and_after_sending(tmp_path: Path, federation_sites: list, five: dict) -> None:
    stage = PRETRAIN
    # One site shared its keys, then died before its update: the sum of the other four.
    plain4 = _fedavg(five, {101, 102, 103, 104})
    one, _ = _run(tmp_path / "s1", federation_sites, stage, True, _drop({105}, "train"))
    assert one.outcomes[0].updated and one.outcomes[0].accepted == [101, 102, 103, 104]
    assert "no reply" in one.outcomes[0].failed[105]
    _close(plain4, one, "pretrain")

    # Two of five died before sending, threshold 3 of 5 share holders: the round completes.
    plain3 = _fedavg(five, {101, 102, 103})
    two, _ = _run(tmp_path / "s2", federation_sites, stage, True, _drop({104, 105}, "train"))
    assert two.outcomes[0].updated and two.outcomes[0].accepted == [101, 102, 103]
    _close(plain3, two, "pretrain")

    # One site died after its masked update arrived, before unmasking: its input is in the sum
    # (the others' shares of its self-mask seed take the mask off).
    plain5 = five["plain"]
    # The four others' shares suffice, so unmasking does not wait out the timeout for 105's.
    late, _ = _run(tmp_path / "s3", federation_sites, stage, True, _drop({105}, SECAGG_UNMASK))
    assert late.outcomes[0].updated and late.outcomes[0].accepted == list(NODES)
    assert late.outcomes[0].failed == {}, late.outcomes[0].failed
    _close(plain5, late, "pretrain")


@pytest.mark.slow
def test_too_few_survivors_leave_the_weights_unchanged(tmp_path: Path, federation_sites: list) -> None:
    stage = {"name": "pretrain", "rounds": 1, "local_steps": 1}
    # Three of five die after sending: 2 survivors hold 2 shares of each secret, 3 are needed.
    pipeline, _ = _run(tmp_path, federation_sites, stage, True, _drop({103, 104, 105}, SECAGG_UNMASK))
    assert not pipeline.outcomes[0].updated
    assert any("shares" in reason for reason in pipeline.outcomes[0].failed.values())
    initial = wire.initial_state(pipeline.cfg)
    assert all(torch.equal(initial[k], pipeline.state[k]) for k in initial)


def _uniform_p(values: np.ndarray) -> float:
    """Chi-square p-value of the top byte of uint32 values against 256 equal bins."""
    counts = np.bincount((values >> 24).astype(np.int64), minlength=256)
    return float(chisquare(counts).pvalue)


@pytest.mark.slow
def test_one_sites_masked_update_is_uniform_noise_and_its_encoding_is_not(tmp_path: Path, federation_sites: list,
                                                                         five: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    stage = PRETRAIN
    got: dict[str, np.ndarray] = {}

    def capture(name: str):
        def tamper(n: int, reply: Message) -> Message:
            if n == 103 and reply.metadata.message_type == "train":
                got[name] = np.concatenate([a.numpy().ravel() for a in reply.content["arrays"].values()])
            return reply
        return tamper

    (masked,) = [r for r in five["grid"].received if r.metadata.message_type == "train"
                 and int(r.metadata.src_node_id) == 103]
    got["masked"] = np.concatenate([a.numpy().ravel() for a in masked.content["arrays"].values()])
    import fedmri.client.secagg as site_secagg

    monkeypatch.setattr(site_secagg, "add_mask", lambda *a, **k: None)  # what a site would send without masks
    _run(tmp_path / "bare", federation_sites, stage, True, capture("bare"))
    assert got["masked"].size == got["bare"].size > 100_000
    assert _uniform_p(got["masked"]) > 1e-4
    assert _uniform_p(got["bare"]) < 1e-12
    assert not np.array_equal(got["masked"], got["bare"])


def test_secure_aggregation_needs_a_sum_strategy_and_no_central_site_dp(tmp_path: Path) -> None:
    stage = {"name": "pretrain", "rounds": 1, "local_steps": 1, "secure_aggregation": SECURE}
    with pytest.raises(ConfigError, match="only the sum"):
        _fed(tmp_path, stage | {"strategy": {"name": "fedmedian"}}, False)
    with pytest.raises(ConfigError, match="central site_dp"):
        _fed(tmp_path, stage | {"site_dp": {"mode": "central"}}, False)
    with pytest.raises(ConfigError, match="training stages"):
        _fed(tmp_path, {"name": "evaluate", "secure_aggregation": SECURE}, False)


def _distributed(z: float) -> dict:
    return {"name": "pretrain", "rounds": 1, "local_steps": 1,
            "site_dp": {"mode": "distributed", "noise_multiplier": z, "clip_norm": 0.05}}


@pytest.mark.slow
def test_distributed_dp_sums_the_sites_noise_shares_to_the_stated_noise(tmp_path: Path,
                                                                       federation_sites: list) -> None:
    dropped = {105}  # m' = 4 of m = 5 contributed: less noise than planned, and accounted as such
    # The same clipped updates (training is seeded) under noise z = 1 and a negligible one: their
    # difference is the noise of the mean, std z C / sqrt(m m') for m' of m sites contributing.
    # Own run names: each site's privacy ledger (next to its catalog) refuses to spend one run's
    # round twice with other numbers.
    noisy, _ = _run(tmp_path / "z1", federation_sites, _distributed(1.0), True, _drop(dropped, "train"),
                    name="distributed-z1")
    quiet, _ = _run(tmp_path / "z0", federation_sites, _distributed(1e-6), True, _drop(dropped, "train"),
                    name="distributed-z0")
    m, contributed = 5, 5 - len(dropped)
    diff = torch.cat([(a.double() - b.double()).ravel() for a, b in
                      zip(_up(noisy, "pretrain").values(), _up(quiet, "pretrain").values(), strict=True)])
    expected = 1.0 * 0.05 / (m * contributed) ** 0.5
    assert diff.numel() > 100_000
    assert abs(float(diff.std()) / expected - 1) < 0.05, (float(diff.std()), expected)
    assert abs(float(diff.mean())) < 5 * expected / diff.numel() ** 0.5
    row = noisy.outcomes[0].aggregated
    assert row["site-dp-noise-multiplier"] == pytest.approx((contributed / m) ** 0.5)
    assert 0 < row["site-dp-epsilon"] < float("inf") and row["secagg-sites"] == contributed
    # Each contributing site recorded the release in its own ledger (dp-* metrics of its reply).
    assert all(0 < metrics["dp-epsilon-run"] < float("inf") for _, metrics, _ in noisy.outcomes[0].replies)


def test_distributed_dp_needs_secure_aggregation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secure_aggregation.enabled"):
        _fed(tmp_path, _distributed(1.0), False)
