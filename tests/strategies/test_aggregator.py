"""Aggregators against hand-computed results, from mock replies built in-process."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

from fedmri.errors import ConfigError
from fedmri.strategies import Aggregator, build_aggregator

SHAPES = {"encoder/patch_embed.weight": (4, 3), "encoder/norm.bias": (3,), "logit_scale/value": ()}
WEIGHTS = {1: 10, 2: 30, 3: 60}  # num-examples per site


def _current(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in SHAPES.items()}


def _steps(round_: int) -> dict[int, dict[str, np.ndarray]]:
    """Each site's local step in a round: different per site and round, same on every call."""
    return {node: {key: np.random.default_rng([round_, node, i]).normal(scale=0.01, size=shape).astype(np.float32)
                   for i, (key, shape) in enumerate(SHAPES.items())} for node in WEIGHTS}


def _replies(make_reply, start: dict[str, np.ndarray], round_: int) -> list[Message]:
    return [make_reply(node, {key: start[key] + step[key] for key in start}, WEIGHTS[node], dino_loss=float(node))
            for node, step in _steps(round_).items()]


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def test_fedavg_is_the_num_examples_weighted_mean(make_reply, record) -> None:
    # Prepare
    current = _current()
    replies = _replies(make_reply, current, 1)
    total = sum(WEIGHTS.values())
    expected = {key: sum(w * (current[key] + _steps(1)[node][key]).astype(np.float64) for node, w in WEIGHTS.items())
                / total for key in SHAPES}
    # Execute
    arrays, metrics = build_aggregator({"name": "fedavg"}).aggregate(1, record(current), replies)
    # Assert
    got = _numpy(arrays)
    assert list(got) == list(SHAPES)
    for key in SHAPES:
        assert got[key].dtype == np.float32 and got[key].shape == SHAPES[key]
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert dict(metrics) == pytest.approx({"dino_loss": (10 * 1 + 30 * 2 + 60 * 3) / total})


@pytest.mark.parametrize("spec", [{"name": "fedmedian"}, {"name": "fedtrimmedavg", "beta": 0.2}])
def test_robust_strategies_ignore_one_outlier(make_reply, record, spec: dict) -> None:
    # Prepare: four honest sites and one that sends 1e4 everywhere (beta 0.2 of 5 trims one per tail).
    current = _current()
    honest = {node: {key: current[key] + 0.01 * node for key in SHAPES} for node in range(1, 5)}
    replies = [make_reply(node, arrays) for node, arrays in honest.items()]
    replies.append(make_reply(9, {key: np.full(shape, 1e4, np.float32) for key, shape in SHAPES.items()}))
    # Execute
    robust, _ = build_aggregator(spec).aggregate(1, record(current), replies)
    mean, _ = build_aggregator({"name": "fedavg"}).aggregate(1, record(current), replies)
    # Assert: inside the honest range per coordinate, where the mean is dragged far out.
    for key, got in _numpy(robust).items():
        low, high = current[key] + 0.01, current[key] + 0.04
        assert np.all(got >= low - 1e-6) and np.all(got <= high + 1e-6)
        assert np.all(mean[key].numpy() > 1000)


def test_trimmed_avg_warns_when_beta_trims_nothing(make_reply, record, caplog) -> None:
    current = _current()
    with caplog.at_level(logging.WARNING):
        build_aggregator({"name": "fedtrimmedavg", "beta": 0.2}).aggregate(1, record(current),
                                                                         _replies(make_reply, current, 1))
    assert "beta=0.2 trims nothing from 3 replies (it needs 5)" in caplog.text


def test_fedadam_steps_as_the_formula_says(make_reply, record) -> None:
    # Prepare
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    aggregator = build_aggregator({"name": "fedadam", "eta": eta, "beta_1": beta_1, "beta_2": beta_2, "tau": tau})
    start = _current()
    x = {key: value.astype(np.float64) for key, value in start.items()}
    m = {key: 0.0 for key in SHAPES}
    v = {key: 0.0 for key in SHAPES}
    current = record(start)
    for t in (1, 2, 3):
        # Execute
        current, _ = aggregator.aggregate(t, current, _replies(make_reply, _numpy(current), t))
        # Assert against Reddi et al. 2021, Alg. 2, with Flower's bias correction (exponent t + 1).
        lr = eta * np.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))
        for key in SHAPES:
            delta = sum(w * _steps(t)[node][key].astype(np.float64) for node, w in WEIGHTS.items()) / 100
            m[key] = beta_1 * m[key] + (1 - beta_1) * delta
            v[key] = beta_2 * v[key] + (1 - beta_2) * delta**2
            x[key] = x[key] + lr * m[key] / (np.sqrt(v[key]) + tau)
            got = current[key].numpy()
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, x[key], rtol=0, atol=2e-5)
    assert not np.allclose(current["encoder/norm.bias"].numpy(), start["encoder/norm.bias"], atol=1e-3)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_resumed_run_is_bit_identical(make_reply, record, name: str) -> None:
    # Prepare
    spec = {"name": name, "eta": 0.05, "tau": 1e-3}

    def run(aggregator: Aggregator, current: ArrayRecord, rounds: range) -> ArrayRecord:
        for t in rounds:
            current, _ = aggregator.aggregate(t, current, _replies(make_reply, _numpy(current), t))
        return current

    # Execute: four rounds straight, and two rounds, a checkpoint, a fresh aggregator, two more.
    straight = run(build_aggregator(spec), record(_current()), range(1, 5))
    first = build_aggregator(spec)
    halfway = run(first, record(_current()), range(1, 3))
    arrays, meta = first.state_dict()
    resumed = build_aggregator(spec)
    resumed.load_state_dict({key: value.copy() for key, value in arrays.items()},
                            json.loads(json.dumps(meta)))
    restarted = run(resumed, halfway, range(3, 5))
    forgetful = run(build_aggregator(spec), halfway, range(3, 5))
    # Assert
    assert sorted(arrays) == sorted(f"{moment}/{key}" for moment in ("m_t", "v_t") for key in SHAPES)
    for key in SHAPES:
        assert np.array_equal(restarted[key].numpy(), straight[key].numpy())
        assert not np.array_equal(forgetful[key].numpy(), straight[key].numpy())


def test_replies_are_left_as_they_came(make_reply, record) -> None:
    current = _current()
    replies = _replies(make_reply, current, 1)
    before = [_numpy(msg.content["arrays"]) for msg in replies]
    build_aggregator({"name": "fedmedian"}).aggregate(1, record(current), replies)
    for msg, arrays in zip(replies, before, strict=True):
        after = _numpy(msg.content["arrays"])
        assert list(after) == list(arrays)
        assert all(np.array_equal(after[key], arrays[key]) for key in arrays)


def test_result_holds_only_the_shipped_keys_in_current_order(make_reply, record) -> None:
    # Prepare: current also holds a group no site trains this stage.
    current = {"teacher/w": np.ones(2, np.float32), **_current()}
    shipped = list(reversed(list(SHAPES)))
    replies = [make_reply(node, {key: current[key] + 0.01 for key in shipped}) for node in (1, 2)]
    # Execute
    arrays, _ = build_aggregator({"name": "fedadam"}).aggregate(1, record(current), replies)
    # Assert
    assert list(arrays.keys()) == list(SHAPES)
    assert all(array.numpy().dtype == np.float32 for array in arrays.values())


def test_metrics_sent_by_some_sites_only_are_left_out(make_reply, record, caplog) -> None:
    current = _current()
    replies = [make_reply(1, current, 10, dino_loss=1.0, ibot_loss=5.0), make_reply(2, current, 30, dino_loss=3.0)]
    with caplog.at_level(logging.WARNING):
        _, metrics = build_aggregator({"name": "fedavg"}).aggregate(1, record(current), replies)
    assert dict(metrics) == pytest.approx({"dino_loss": 2.5})
    assert "left out of the mean: ibot_loss" in caplog.text


def test_a_round_without_replies_keeps_current_and_the_moments(make_reply, record) -> None:
    current = record(_current())
    aggregator = build_aggregator({"name": "fedadam"})
    aggregator.aggregate(1, current, _replies(make_reply, _current(), 1))
    moments, meta = aggregator.state_dict()
    arrays, metrics = aggregator.aggregate(2, current, [make_reply(1, error="timeout")])
    assert _numpy(arrays).keys() == _current().keys()
    assert all(np.array_equal(arrays[key].numpy(), current[key].numpy()) for key in SHAPES)
    assert dict(metrics) == {}
    after, after_meta = aggregator.state_dict()
    assert all(np.array_equal(after[key], moments[key]) for key in moments)
    assert meta["steps"] == after_meta["steps"] == 1


def test_fedadam_bias_correction_counts_steps_not_rounds(make_reply, record) -> None:
    # Prepare: a stage that starts at global round 7 takes the same first step as one at round 1.
    current = _current()
    replies = _replies(make_reply, current, 1)
    # Execute
    at_one, _ = build_aggregator({"name": "fedadam"}).aggregate(1, record(current), replies)
    at_seven, _ = build_aggregator({"name": "fedadam"}).aggregate(7, record(current), replies)
    # Assert
    assert all(np.array_equal(at_one[key].numpy(), at_seven[key].numpy()) for key in SHAPES)


def test_replies_with_different_names_are_refused(make_reply, record) -> None:
    current = _current()
    partial = {key: value for key, value in current.items() if key != "logit_scale/value"}
    with pytest.raises(ValueError, match="site 2 sent other parameter names than site 1"):
        build_aggregator({"name": "fedavg"}).aggregate(1, record(current),
                                                       [make_reply(1, current), make_reply(2, partial)])
    with pytest.raises(ValueError, match="'extra/w', which was not shipped"):
        build_aggregator({"name": "fedavg"}).aggregate(1, record(partial),
                                                       [make_reply(1, {**partial, "extra/w": np.ones(1)})])


def test_state_from_another_strategy_is_refused(make_reply, record) -> None:
    adam = build_aggregator({"name": "fedadam"})
    adam.aggregate(1, record(_current()), _replies(make_reply, _current(), 1))
    arrays, meta = adam.state_dict()
    with pytest.raises(ConfigError, match="state of the 'fedadam' aggregator, but this stage aggregates with"):
        build_aggregator({"name": "fedyogi"}).load_state_dict(arrays, meta)
    with pytest.raises(ConfigError, match="holds arrays"):
        build_aggregator({"name": "fedavg"}).load_state_dict(arrays, {"name": "fedavg"})
    with pytest.raises(ConfigError, match="holds 'momentum/x'"):
        build_aggregator({"name": "fedadam"}).load_state_dict({"momentum/x": np.zeros(1)}, meta)
    with pytest.raises(ConfigError, match="has steps -1"):
        build_aggregator({"name": "fedadam"}).load_state_dict(arrays, {"name": "fedadam", "steps": -1})


def test_moments_for_other_parameters_are_refused(make_reply, record) -> None:
    adam = build_aggregator({"name": "fedadam"})
    adam.load_state_dict({"m_t/other/w": np.zeros(1, np.float32), "v_t/other/w": np.zeros(1, np.float32)},
                         {"name": "fedadam", "steps": 1})
    with pytest.raises(ConfigError, match="moments were made for other parameters"):
        adam.aggregate(1, record(_current()), _replies(make_reply, _current(), 1))


def test_stateless_state_round_trips() -> None:
    aggregator = build_aggregator({"name": "fedmedian"})
    arrays, meta = aggregator.state_dict()
    assert arrays == {} and json.loads(json.dumps(meta)) == {"name": "fedmedian"}
    aggregator.load_state_dict(arrays, meta)
