"""Update validation from mock replies: layout, names, shapes, dtypes, finite values, norm bound."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, MetricRecord, RecordDict

from fedmri.errors import ConfigError
from fedmri.strategies import ValidationReport, norm_outliers, validate_metrics, validate_replies, validate_update

KEYS = ("encoder/blocks.0.attn.qkv.weight", "encoder/blocks.0.attn.qkv.bias", "dino_head/last.weight")


def _current() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = ((6, 4), (6,), (4, 3))
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in zip(KEYS, shapes, strict=True)}


def _moved(start: dict[str, np.ndarray], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    """``start`` plus a random step of about ``scale`` per entry, what an honest site sends."""
    rng = np.random.default_rng(seed)
    return {key: (value + scale * rng.normal(size=value.shape)).astype(np.float32) for key, value in start.items()}


def test_matching_update_passes(record) -> None:
    current = _current()
    assert validate_update(record(current), record(_moved(current, 1))) is None
    assert validate_update(current, record(_moved(current, 1))) is None


@pytest.mark.parametrize(("break_it", "words"), [
    (lambda u: u[KEYS[0]].__setitem__((0, 0), np.nan), f"{KEYS[0]!r} has 1 non-finite"),
    (lambda u: u[KEYS[1]].__setitem__(2, np.inf), f"{KEYS[1]!r} has 1 non-finite"),
    (lambda u: u.__setitem__(KEYS[2], np.zeros((3, 4), np.float32)), f"{KEYS[2]!r} has shape (3, 4), expected (4, 3)"),
    (lambda u: u.__setitem__(KEYS[1], u[KEYS[1]].astype(np.float64)),
     f"{KEYS[1]!r} has dtype float64, expected float32"),
    (lambda u: u.pop(KEYS[2]), f"missing key {KEYS[2]!r}"),
    (lambda u: u.__setitem__("teacher/w", np.zeros(2, np.float32)), "unexpected key 'teacher/w'"),
], ids=["nan", "inf", "shape", "dtype", "missing", "extra"])
def test_bad_update_is_named(record, break_it, words: str) -> None:
    # Prepare
    current = _current()
    update = _moved(current, 1)
    break_it(update)
    # Execute
    reason = validate_update(record(current), record(update))
    # Assert
    assert reason is not None and words in reason


def test_undecodable_array_is_rejected(record) -> None:
    current = _current()
    update = record(current)
    update[KEYS[1]] = Array(dtype="float32", shape=(6,), stype="torch.raw", data=b"\x00" * 24)
    reason = validate_update(current, update)
    assert reason is not None and f"{KEYS[1]!r} cannot be read" in reason


@pytest.mark.parametrize(("metrics", "words"), [
    ({"loss": 1.0}, "lack 'num-examples'"),
    ({"num-examples": 0}, "must be a finite number > 0, got 0"),
    ({"num-examples": -3.0}, "got -3.0"),
    ({"num-examples": float("nan")}, "got nan"),
    ({"num-examples": [1, 2]}, "must be one number"),
    ({"num-examples": 8, "dino_loss": float("inf")}, "metric 'dino_loss' is not finite"),
    ({"num-examples": 8, "per_crop": [1.0, float("nan")]}, "metric 'per_crop' is not finite"),
])
def test_bad_metrics_are_named(metrics: dict, words: str) -> None:
    reason = validate_metrics(MetricRecord(metrics))
    assert reason is not None and words in reason


def test_good_metrics_pass() -> None:
    assert validate_metrics(MetricRecord({"num-examples": 8, "dino_loss": 2.5, "per_crop": [1.0, 2.0]})) is None


@pytest.mark.parametrize("honest", [3, 2], ids=["3-honest", "2-honest"])
def test_norm_bound_rejects_a_1000x_update_and_keeps_the_honest(record, honest: int) -> None:
    # Prepare: the attacker's step is 1000x an honest one.
    current = _current()
    updates = {node: record(_moved(current, node)) for node in range(1, honest + 1)}
    updates[99] = record(_moved(current, 99, scale=10.0))
    # Execute
    rejected = norm_outliers(record(current), updates, factor=10)
    # Assert
    assert list(rejected) == [99]
    assert "median" in rejected[99]


def test_two_updates_compare_against_the_smaller(record) -> None:
    current = _current()
    updates = {1: record(_moved(current, 1)), 99: record(_moved(current, 99, scale=10.0))}
    rejected = norm_outliers(current, updates, factor=10)
    assert list(rejected) == [99]
    assert "smallest" in rejected[99]
    # Two honest sites of different but comparable step sizes both pass.
    updates[99] = record(_moved(current, 99, scale=0.05))
    assert norm_outliers(current, updates, factor=10) == {}


def test_a_lone_update_is_held_only_to_the_absolute_bound(record) -> None:
    current = _current()
    lone = {5: record(_moved(current, 5, scale=10.0))}
    assert norm_outliers(current, lone, factor=10) == {}
    rejected = norm_outliers(current, lone, factor=10, max_norm=1.0)
    assert list(rejected) == [5] and "absolute bound 1" in rejected[5]


def test_a_round_where_nobody_moved_rejects_nobody(record) -> None:
    current = _current()
    updates = {node: record(current) for node in (1, 2, 3)}
    assert norm_outliers(current, updates, factor=10) == {}
    assert norm_outliers(current, {1: record(current), 2: record(current)}, factor=10) == {}


def test_a_zero_median_skips_the_relative_test_but_not_the_absolute_bound(record) -> None:
    current = _current()
    updates = {1: record(current), 2: record(current), 3: record(_moved(current, 3, scale=1.0))}
    assert norm_outliers(current, updates, factor=10) == {}
    assert list(norm_outliers(current, updates, factor=10, max_norm=0.5)) == [3]


@pytest.mark.parametrize(("factor", "max_norm", "words"), [(0.5, None, "norm factor 0.5"), (10, 0.0, "max_norm 0.0")])
def test_illegal_bounds(record, factor: float, max_norm: float | None, words: str) -> None:
    current = _current()
    with pytest.raises(ConfigError, match=words):
        norm_outliers(current, {1: record(current)}, factor=factor, max_norm=max_norm)
    with pytest.raises(ConfigError, match=words):
        validate_replies(record(current), [], factor=factor, max_norm=max_norm)


def test_validate_replies_keeps_the_honest_and_names_every_rejection(make_reply, record) -> None:
    # Prepare: three honest sites and one of each kind of bad reply.
    current = _current()
    nan = _moved(current, 4)
    nan[KEYS[0]][1, 1] = np.nan
    wrong_shape = {**_moved(current, 5), KEYS[1]: np.zeros(7, np.float32)}
    replies = [
        make_reply(1, _moved(current, 1), dino_loss=2.0),
        make_reply(4, nan),
        make_reply(2, _moved(current, 2), dino_loss=2.1),
        make_reply(5, wrong_shape),
        make_reply(6, error="CUDA out of memory"),
        make_reply(7, content=RecordDict({"arrays": record(_moved(current, 7))})),
        make_reply(8, _moved(current, 8), num_examples=0),
        make_reply(9, _moved(current, 9, scale=10.0)),
        make_reply(3, _moved(current, 3), dino_loss=1.9),
    ]
    # Execute
    accepted, rejected = validate_replies(record(current), replies, factor=10)
    # Assert
    assert [msg.metadata.src_node_id for msg in accepted] == [1, 2, 3]
    assert sorted(rejected) == [4, 5, 6, 7, 8, 9]
    assert "non-finite" in rejected[4]
    assert "shape (7,)" in rejected[5]
    assert "CUDA out of memory" in rejected[6]
    assert "lacks the MetricRecord 'metrics'" in rejected[7]
    assert "'num-examples'" in rejected[8]
    assert "median" in rejected[9]


def test_validate_replies_with_two_honest_and_one_attacker(make_reply, record) -> None:
    current = _current()
    replies = [make_reply(1, _moved(current, 1)), make_reply(66, _moved(current, 66, scale=10.0)),
               make_reply(2, _moved(current, 2))]
    accepted, rejected = validate_replies(record(current), replies)
    assert [msg.metadata.src_node_id for msg in accepted] == [1, 2]
    assert list(rejected) == [66]


def test_a_reply_without_arrays_is_rejected(make_reply, record) -> None:
    current = _current()
    reply = make_reply(3, content=RecordDict({"metrics": MetricRecord({"num-examples": 4})}))
    accepted, rejected = validate_replies(record(current), [reply])
    assert accepted == [] and "lacks the ArrayRecord 'arrays'" in rejected[3]


def test_two_replies_from_one_site_are_a_pipeline_bug(make_reply, record) -> None:
    current = _current()
    with pytest.raises(ValueError, match="two replies from node 1"):
        validate_replies(record(current), [make_reply(1, current), make_reply(1, current)])


def test_report_summarises_the_round(make_reply, record) -> None:
    current = _current()
    replies = [make_reply(1, current), make_reply(2, error="declined: privacy budget spent")]
    report = ValidationReport.from_result(*validate_replies(record(current), replies))
    assert report.accepted == [1]
    assert report.summary() == "1 accepted, 1 rejected (site 2: site reported an error (code 1): " \
                               "declined: privacy budget spent)"
    assert dict(report.as_metrics()) == {"sites-accepted": 1, "sites-rejected": 1}
