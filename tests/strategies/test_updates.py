"""Streamed aggregation: updates checked as they come, spilled beyond a memory budget, folded in content order.

The reference for every strategy is Flower's own ``aggregate_train`` on the list of
replies (what the pipeline called before it streamed). The streamed aggregate must
equal it bit for bit, whether the updates stay in memory or all go to disk, in
whatever order they arrive, and with blocks of a few coordinates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedmri.strategies import STRATEGIES, build_aggregator
from fedmri.strategies.site_dp import CentralSiteDP, clip_update
from fedmri.strategies.updates import RoundUpdates, coordinatewise

SHAPES = {"encoder/blocks.0.w": (7, 5), "encoder/blocks.0.b": (5,), "encoder/logit_scale": (), "head/w": (3, 4, 2)}
SPECS = {"fedavg": {}, "fedprox": {"proximal_mu": 0.1}, "fedadam": {"eta": 0.05}, "fedyogi": {"eta": 0.05},
         "fedtrimmedavg": {"beta": 0.2}, "fedmedian": {}}


def _current() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {key: np.asarray(rng.normal(size=shape), dtype=np.float32) for key, shape in SHAPES.items()}


def _replies(make_reply, n: int, seed: int = 1) -> list[Message]:
    rng = np.random.default_rng(seed)
    current = _current()
    return [make_reply(100 + i, {key: np.asarray(value + rng.normal(scale=0.1, size=value.shape), dtype=np.float32)
                                 for key, value in current.items()},
                       num_examples=float(rng.integers(5, 50)), loss=float(rng.uniform()), acc=float(rng.uniform()))
            for i in range(n)]


def _flower(name: str, current: ArrayRecord, replies: list[Message], rounds: int = 1) -> list[ArrayRecord]:
    """Flower's aggregate_train on the list, replies ordered by content as the pipeline orders them."""
    strategy = build_aggregator({"name": name, **SPECS[name]}).strategy
    with RoundUpdates.from_replies(current, replies) as updates:
        order = [u.node for u in updates.accepted]
    by_node = {int(m.metadata.src_node_id): m for m in replies}
    out = []
    for step in range(1, rounds + 1):
        if hasattr(strategy, "current_arrays"):
            strategy.current_arrays = {key: current[key].numpy() for key in current.keys()}
        arrays, _ = strategy.aggregate_train(step, [copy.deepcopy(by_node[n]) for n in order])
        out.append(arrays)
    return out


def _equal(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        x, y = a[key].numpy(), b[key].numpy().astype(a[key].numpy().dtype)
        assert x.shape == y.shape, key
        assert np.array_equal(x, y), f"{key}: max difference {np.abs(x.astype(np.float64) - y).max()}"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("memory_bytes", [0, 1 << 30], ids=["spilled", "in-memory"])
def test_streamed_aggregate_equals_flowers_aggregate_of_the_list(name, memory_bytes, make_reply, record,
                                                                 tmp_path) -> None:
    current = record(_current())
    replies = _replies(make_reply, 7)
    expected = _flower(name, current, replies, rounds=2)
    aggregator = build_aggregator({"name": name, **SPECS[name]})
    for step in (1, 2):  # the FedOpt family's second step uses the moments of the first
        # Arrival order reversed: the aggregate must not depend on it.
        with RoundUpdates(current, memory_bytes=memory_bytes, spill_dir=tmp_path) as updates:
            for msg in reversed(replies):
                assert updates.offer(copy.deepcopy(msg)) is None
            assert updates.spilled == (7 if memory_bytes == 0 else 0)
            arrays, metrics = aggregator.aggregate(step, current, updates)
        _equal(arrays, expected[step - 1])
    weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
    loss = sum(w * float(m.content["metrics"]["loss"]) for w, m in zip(weights, replies, strict=True)) / sum(weights)
    assert metrics["loss"] == pytest.approx(loss)
    assert not list(tmp_path.iterdir()), "close() removes the spilled files"


@pytest.mark.parametrize("reduce", ["median", "trimmed"])
def test_coordinate_blocks_of_a_few_bytes_give_the_same_result(reduce, make_reply, record, tmp_path) -> None:
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    fn = (lambda s: np.median(s, axis=0)) if reduce == "median" else (lambda s: trim_mean(s, 0.2))
    with RoundUpdates.from_replies(record(_current()), _replies(make_reply, 9), memory_bytes=0,
                                   spill_dir=tmp_path) as updates:
        whole = coordinatewise(updates, fn, block_bytes=1 << 30)
        blocks = coordinatewise(updates, fn, block_bytes=9 * 4 * 3)  # 3 coordinates at a time
    for key in SHAPES:
        assert whole[key].shape == SHAPES[key]
        assert np.array_equal(whole[key], blocks[key])


def test_central_site_dp_on_streamed_updates_equals_the_clipped_mean_of_the_list(make_reply, record,
                                                                                 tmp_path) -> None:
    current = record(_current())
    replies = _replies(make_reply, 5)
    # With z = 0 there is no noise to compare; the clip and the equal weights must match.
    clip = 0.5
    views = []
    for msg in replies:
        clipped, _ = clip_update(current, msg.content["arrays"], clip)
        views.append(Message(RecordDict({"arrays": clipped, "metrics": MetricRecord(
            dict(msg.content["metrics"].items()) | {"num-examples": 1})}), metadata=copy.copy(msg.metadata)))
    # The pipeline orders updates by the content the sites sent, before the clip.
    with RoundUpdates.from_replies(current, replies) as updates:
        order = {u.node: i for i, u in enumerate(updates.accepted)}
    views.sort(key=lambda m: order[int(m.metadata.src_node_id)])
    expected, _ = build_aggregator({"name": "fedavg"}).strategy.aggregate_train(1, views)
    dp = CentralSiteDP(build_aggregator({"name": "fedavg"}), clip, 0.0, np.random.default_rng(0))
    with RoundUpdates(current, memory_bytes=0, spill_dir=tmp_path) as updates:
        for msg in replies:
            updates.offer(msg)
        arrays, metrics = dp.aggregate(1, current, updates)
    _equal(arrays, expected)
    assert metrics["site-dp-clipped"] == 5  # every delta (norm ~ 0.1 * sqrt(81)) is above 0.5
    assert metrics["loss"] == pytest.approx(np.mean([float(m.content["metrics"]["loss"]) for m in replies]))


def test_a_rejected_update_never_touches_the_aggregate(make_reply, record, tmp_path) -> None:
    current = record(_current())
    honest = _replies(make_reply, 4)
    poisoned = {key: value * 1000 for key, value in _current().items()}
    nan = {key: np.full(value.shape, np.nan, dtype=np.float32) for key, value in _current().items()}
    aggregator = build_aggregator({"name": "fedavg"})
    with RoundUpdates(current, memory_bytes=0, spill_dir=tmp_path) as updates:
        assert "non-finite" in updates.offer(make_reply(7, nan))
        for msg in honest[:2]:
            updates.offer(msg)
        assert updates.offer(make_reply(8, poisoned)) is None  # passes the per-reply checks ...
        for msg in honest[2:]:
            updates.offer(msg)
        rejected = updates.reject_outliers(10.0)  # ... and falls to the round's norm bound
        assert set(rejected) == {8} and "median" in rejected[8]
        assert set(updates.rejected) == {7, 8}
        assert sorted(u.node for u in updates.accepted) == [100, 101, 102, 103]
        assert len(list(tmp_path.glob("*/*.raw"))) == 4, "the rejected update's file is gone"
        streamed, _ = aggregator.aggregate(1, current, updates)
    _equal(streamed, _flower("fedavg", current, honest)[0])


def test_memory_stays_within_the_budget_and_the_rest_waits_on_disk(make_reply, record, tmp_path) -> None:
    current = record(_current())
    one = sum(int(np.prod(shape, dtype=np.int64)) * 4 for shape in SHAPES.values())
    with RoundUpdates(current, memory_bytes=3 * one, spill_dir=tmp_path) as updates:
        for msg in _replies(make_reply, 10):
            updates.offer(msg)
        assert updates.peak_in_memory == 3 * one
        assert updates.spilled == 7
        spilled = [u for u in updates.accepted if u.path is not None]
        arrays = updates.arrays(spilled[0])
        assert isinstance(arrays["head/w"], np.memmap) and arrays["head/w"].shape == (3, 4, 2)
        assert arrays["encoder/logit_scale"].shape == ()
    assert not list(tmp_path.glob("*/*.raw"))


def test_two_replies_from_one_site_and_keys_that_were_not_shipped_are_refused(make_reply, record) -> None:
    current = record(_current())
    replies = _replies(make_reply, 2)
    with RoundUpdates(current) as updates:
        updates.offer(replies[0])
        with pytest.raises(ValueError, match="two replies from node 100"):
            updates.offer(replies[0])
    extra = make_reply(5, {**_current(), "other/w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="'other/w', which was not shipped"):
        RoundUpdates.from_replies(current, [extra])
    short = ArrayRecord({key: Array(value) for key, value in _current().items() if key != "head/w"})
    with RoundUpdates(short) as updates:
        assert "unexpected key 'head/w'" in updates.offer(make_reply(6, _current()))


def test_the_median_of_many_spilled_updates_keeps_few_files_open(make_reply, record, tmp_path) -> None:
    resource = pytest.importorskip("resource")
    current = {f"encoder/blocks.{i}.w": np.full((3, 2), float(i), dtype=np.float32) for i in range(30)}
    replies = [make_reply(100 + n, {k: v + np.float32(n) for k, v in current.items()}) for n in range(20)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # 20 updates x 30 arrays would be 600 memory maps at once, each one a file descriptor.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        with RoundUpdates.from_replies(record(current), replies, memory_bytes=0, spill_dir=tmp_path) as updates:
            arrays, _ = build_aggregator({"name": "fedmedian"}).aggregate(1, record(current), updates)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert np.array_equal(arrays["encoder/blocks.7.w"].numpy(), np.full((3, 2), 7 + 9.5, dtype=np.float32))
