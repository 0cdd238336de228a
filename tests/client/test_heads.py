"""The heads stage at a site: task heads on cached features of the frozen encoder, and their metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from opacus.validators import ModuleValidator

from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest
from fedmri.client.trainers.heads import (
    evaluate_heads,
    run_heads,
    series_loss,
    site_features,
    task_targets,
)
from fedmri.errors import ConfigError
from fedmri.heads.features import FeatureCache
from fedmri.heads.tasks import TASKS, TRUNK, build_task_heads, load_task_heads_state, task_heads_state, task_outputs
from fedmri.metrics import multiclass_metrics
from fedmri.wire import HEAD_PREFIX, group_of, head_groups, initial_state, select, stage_groups


@pytest.fixture()
def run_cfg(small_cfg: DictConfig, tmp_path: Path) -> DictConfig:
    """The small run config with a fresh feature cache per test."""
    return OmegaConf.merge(small_cfg, {"heads": {"cache_dir": str(tmp_path / "features")}})


@pytest.fixture()
def site_cfg(site_file: Path) -> DictConfig:
    return load_site(site_file)


@pytest.fixture()
def heads_request(request_values: Any, run_cfg: DictConfig) -> TrainRequest:
    return TrainRequest.from_config(request_values("heads", local_steps=10, lr=3e-3, weight_decay=1e-4))


def _down(initial: dict, run_cfg: DictConfig) -> dict:
    return select(initial, stage_groups("heads", run_cfg).down)


@pytest.fixture()
def compute_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Volumes the encoder computed features for, one entry per forward pass."""
    calls: list[int] = []
    real = FeatureCache._compute

    def spy(self: FeatureCache, images: torch.Tensor) -> Any:
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(FeatureCache, "_compute", spy)
    return calls


def test_task_heads_state_round_trips(small_cfg: DictConfig) -> None:
    torch.manual_seed(0)
    heads = build_task_heads(small_cfg)
    assert list(heads) == [TRUNK, *small_cfg.heads.tasks]  # heads.trunk_dim: a shared trunk by default
    assert ModuleValidator.validate(heads, strict=False) == []  # DP-safe: no batch norm
    state = task_heads_state(heads)
    assert {group_of(k) for k in state} == {f"{HEAD_PREFIX}{t}" for t in list(heads)}
    torch.manual_seed(1)
    other = build_task_heads(small_cfg)
    load_task_heads_state(other, state)
    assert all(torch.equal(v, task_heads_state(other)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        load_task_heads_state(other, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="head.extra/w"):
        load_task_heads_state(other, state | {"head.extra/w": torch.zeros(1)})


def test_a_shared_trunk_feeds_every_mlp_head_and_travels_as_its_own_group(small_cfg: DictConfig) -> None:
    cfg = OmegaConf.merge(small_cfg, {"heads": {"trunk_dim": 24}})
    torch.manual_seed(0)
    heads = build_task_heads(cfg)
    assert list(heads) == [TRUNK, *cfg.heads.tasks]
    assert head_groups(cfg) == (f"{HEAD_PREFIX}{TRUNK}", *(f"{HEAD_PREFIX}{t}" for t in cfg.heads.tasks))
    assert stage_groups("heads", cfg).up == head_groups(cfg)
    assert {group_of(k) for k in task_heads_state(heads)} == set(head_groups(cfg))
    assert ModuleValidator.validate(heads, strict=False) == []
    assert all(heads[t].net[0].normalized_shape == (24,) for t in cfg.heads.tasks)  # they read the trunk
    features = torch.randn(3, heads[TRUNK].net[0].normalized_shape[0])
    out = task_outputs(heads.eval(), features)
    assert list(out) == list(cfg.heads.tasks)
    assert out["sequence"].shape == (3, TASKS["sequence"].out_dim)
    assert torch.equal(out["sex"], heads["sex"](heads[TRUNK](features)))
    # Only the dense heads: nothing reads a trunk, so there is none.
    assert head_groups(OmegaConf.merge(cfg, {"heads": {"tasks": ["segmentation"]}})) == (f"{HEAD_PREFIX}segmentation",)
    with pytest.raises(ConfigError, match="heads.trunk_dim -1"):
        build_task_heads(OmegaConf.merge(cfg, {"heads": {"trunk_dim": -1}}))


def test_unknown_task_is_a_config_error(small_cfg: DictConfig) -> None:
    cfg = OmegaConf.merge(small_cfg, {"heads": {"tasks": ["findings", "tumour_grade"]}})
    with pytest.raises(ConfigError, match="tumour_grade.*known tasks: findings, sequence"):
        build_task_heads(cfg)


def test_targets_mask_unknown_labels() -> None:
    rows = [
        {"findings": torch.tensor([1.0, 0, 0, 0, 0]), "age": 30.0, "sex": 1,
         "meta": {"sequence": "T2", "body_region": "knee"}},
        {"findings": torch.full((5,), -1.0), "age": math.nan, "sex": 2,
         "meta": {"sequence": "unknown", "body_region": "foot"}},
    ]
    known = {t: k.tolist() for t, (_, k) in task_targets(list(TASKS), rows).items()}
    assert known == {"findings": [True, False], "sequence": [True, False], "body_region": [True, True],
                     "age": [True, False], "sex": [True, False]}
    assert TASKS["body_region"].targets(rows)[0].tolist()[1] == TASKS["body_region"].classes.index("other")
    samples = [{"labels": {k: r[k] for k in ("findings", "age", "sex")}, "meta": r["meta"]} for r in rows]
    assert {t: k.tolist() for t, (_, k) in task_targets(list(TASKS), samples).items()} == known


def test_heads_round_changes_only_head_weights(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                               heads_request: TrainRequest) -> None:
    down = _down(initial, run_cfg)
    up, metrics = run_heads(site_cfg, run_cfg, down, heads_request)
    assert set(up) == {k for k in down if k.startswith(HEAD_PREFIX)}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in up.values())
    assert any(not torch.equal(v, down[k]) for k, v in up.items())
    assert metrics["num-examples"] == 10 * 4 and metrics["steps"] == 10
    assert {f"loss_{t}" for t in run_cfg.heads.tasks} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounds_lower_the_train_loss(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                     heads_request: TrainRequest, seed: int) -> None:
    state = _down(initial, run_cfg)
    losses = []
    for r in range(1, 4):
        up, metrics = run_heads(site_cfg, run_cfg, state, dataclasses.replace(heads_request, seed=seed, round=r))
        state = state | up
        losses.append(metrics["loss"])
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("dp", [False, True])
def test_rounds_with_a_shared_trunk_train_it_and_score(site_cfg: DictConfig, run_cfg: DictConfig,
                                                       heads_request: TrainRequest, tmp_path: Path, dp: bool) -> None:
    from fedmri.client.privacy.gate import PrivacyGate

    cfg = OmegaConf.merge(run_cfg, {"heads": {"trunk_dim": 32}})
    torch.manual_seed(0)
    state = _down(initial_state(cfg), cfg)
    request = dataclasses.replace(heads_request, dp=dp, dp_noise_multiplier=0.5, dp_max_grad_norm=1.0)
    losses = []
    for r in range(1, 4):
        gate = PrivacyGate(site_cfg, request, ledger_path=tmp_path / "ledger.sqlite") if dp else None
        up, metrics = run_heads(site_cfg, cfg, state, dataclasses.replace(request, round=r), privacy=gate)
        assert set(up) == {k for k in state if k.startswith(HEAD_PREFIX)}
        assert any(not torch.equal(v, state[k]) for k, v in up.items() if group_of(k) == f"{HEAD_PREFIX}{TRUNK}")
        state = state | up
        losses.append(metrics["loss"])
    if not dp:  # under DP-SGD noise three rounds need not descend; that they run and move the trunk is the point
        assert losses[-1] < 0.6 * losses[0], losses
    scores = evaluate_heads(site_cfg, cfg, state, "train")
    assert {"sequence_accuracy", "body_region_accuracy", "age_mae"} <= set(scores)


def test_feature_cache_hit_then_invalidated(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                            heads_request: TrainRequest, compute_calls: list[int]) -> None:
    down = _down(initial, run_cfg)
    run_heads(site_cfg, run_cfg, down, heads_request)
    assert sum(compute_calls) == 8  # the 8 train series
    entries = sorted(Path(run_cfg.heads.cache_dir).rglob("*.safetensors"))
    assert len(entries) == 8
    compute_calls.clear()
    run_heads(site_cfg, run_cfg, down, dataclasses.replace(heads_request, round=2))
    assert compute_calls == []
    new_encoder = dict(down)
    key = next(k for k in down if k.startswith("encoder/"))
    new_encoder[key] = down[key] + 0.01
    run_heads(site_cfg, run_cfg, new_encoder, dataclasses.replace(heads_request, round=3))
    assert sum(compute_calls) == 8
    assert len(list(Path(run_cfg.heads.cache_dir).rglob("*.safetensors"))) == 16


def test_evaluate_heads_metrics(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                heads_request: TrainRequest) -> None:
    state = _down(initial, run_cfg)
    up, _ = run_heads(site_cfg, run_cfg, state, heads_request)
    state = initial | up  # as the evaluate message carries them: every group
    metrics = evaluate_heads(site_cfg, run_cfg, state, "train")
    assert metrics["heads-examples"] == 8
    assert {"sequence_accuracy", "sequence_f1_macro", "body_region_accuracy", "age_mae", "sex_accuracy"} <= set(metrics)
    for name, value in metrics.items():
        assert math.isfinite(value), name
        if "_auroc" in name or "_accuracy" in name or "_f1" in name:
            assert 0.0 <= value <= 1.0, (name, value)
    assert metrics["age_mae"] >= 0.0
    # Each headline figure carries its 95% interval over resamples of the site's patients, around it.
    assert 1 <= metrics["heads-patients"] <= 8
    for name in ("sequence_accuracy", "body_region_accuracy", "age_mae"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name

    features, rows = site_features(site_cfg, run_cfg, state, "train")
    heads = build_task_heads(run_cfg).eval()
    load_task_heads_state(heads, up)
    target, known = TASKS["sequence"].targets(rows)
    with torch.no_grad():
        outputs = task_outputs(heads, features)
    scores = outputs["sequence"][known]
    expected = multiclass_metrics(scores, target[known], len(TASKS["sequence"].classes))
    assert {k: metrics[f"sequence_{k}"] for k in expected} == pytest.approx(expected)

    # Findings within the regions where each occurs, from the same scores.
    target, known = TASKS["findings"].targets(rows)
    scores = outputs["findings"]
    regions = [row["meta"]["body_region"] for row in rows]
    expected = TASKS["findings"].region_metrics(scores, target, known, regions)
    assert "auroc_in_region_macro" in expected, "the fixture site needs a region with and without a finding"
    assert {k: metrics.get(f"findings_{k}") for k in expected} == pytest.approx(expected)


def test_dp_round_runs_and_records_nothing(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                          heads_request: TrainRequest, tmp_path: Path) -> None:
    from fedmri.client.privacy.gate import PrivacyGate
    from fedmri.client.privacy.ledger import PrivacyLedger

    request = dataclasses.replace(heads_request, dp=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    gate = PrivacyGate(site_cfg, request, ledger_path=tmp_path / "ledger.sqlite")
    down = _down(initial, run_cfg)
    up, metrics = run_heads(site_cfg, run_cfg, down, request, privacy=gate)
    assert set(up) == {k for k in down if k.startswith(HEAD_PREFIX)}
    assert metrics["steps"] == 10 and all(math.isfinite(v) for v in metrics.values())
    assert "heads" in gate.plans
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.entries() == []  # the ClientApp records, after the round


@pytest.mark.parametrize("trunk_dim", [0, 16])
@pytest.mark.parametrize("vectorized", [True, False])
def test_per_sample_gradient_ignores_the_rest_of_the_batch(small_cfg: DictConfig, vectorized: bool,
                                                           trunk_dim: int) -> None:
    from fedmri.client.privacy.dp_sgd import per_sample_grads

    torch.manual_seed(0)
    cfg = OmegaConf.merge(small_cfg, {"heads": {"dropout": 0.0, "trunk_dim": trunk_dim}})
    heads = build_task_heads(cfg)
    tasks = [t for t in heads if t in TASKS]
    params = dict(heads.named_parameters())
    loss_fn = series_loss(heads, tasks)
    dim = (heads[TRUNK] if trunk_dim else heads["findings"]).net[0].normalized_shape[0]

    def sample(i: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(i)
        return (torch.randn(dim, generator=g), (torch.rand(5, generator=g) > 0.5).float(),
                torch.tensor(i % 9), torch.tensor(i % 15), torch.tensor(40.0 + i), torch.tensor(float(i % 2)),
                torch.tensor([1.0, 1.0, 0.0 if i == 1 else 1.0, 1.0, 1.0]))

    batch = per_sample_grads(loss_fn, params, [sample(i) for i in range(4)], vectorized)
    other = per_sample_grads(loss_fn, params, [sample(0), sample(7), sample(8)], vectorized)
    alone = per_sample_grads(loss_fn, params, [sample(0)], vectorized)
    for name in params:
        assert torch.allclose(batch[name][0], alone[name][0], atol=1e-6), name
        assert torch.allclose(other[name][0], alone[name][0], atol=1e-6), name
    assert all(batch[name][0].abs().sum() > 0 for name in params if name.startswith(f"{TRUNK}."))
    assert any(batch[name][0].abs().sum() > 0 for name in params)


def test_declines_without_any_label(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                     heads_request: TrainRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmri.client.trainers import DeclineError
    from fedmri.client.trainers import heads as heads_trainer

    unknown = {t: (torch.zeros(8), torch.zeros(8, dtype=torch.bool)) for t in run_cfg.heads.tasks}
    monkeypatch.setattr(heads_trainer, "task_targets", lambda tasks, rows: unknown)
    with pytest.raises(DeclineError, match="no series .* has a label"):
        run_heads(site_cfg, run_cfg, _down(initial, run_cfg), heads_request)
