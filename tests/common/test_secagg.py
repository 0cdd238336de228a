"""SecAgg+ primitives: key agreement, masks that cancel, fixed point without overflow, the graph, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedmri.secagg import (
    MAX_SIGNED,
    SecAggError,
    add_mask,
    agree,
    clip_l2,
    decode,
    encode,
    expand,
    fixed_point_scale,
    generate_keypair,
    neighbour_graph,
    quantisation_bound,
    share_threshold,
)


def test_both_sides_agree_on_a_seed_bound_to_purpose_and_round():
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    assert agree(a_priv, b_pub, "mask", "run/1") == agree(b_priv, a_pub, "mask", "run/1")
    assert agree(a_priv, b_pub, "mask", "run/1") != agree(a_priv, b_pub, "mask", "run/2")
    assert agree(a_priv, b_pub, "mask", "run/1") != agree(a_priv, b_pub, "shares", "run/1")
    with pytest.raises(SecAggError, match="key agreement"):
        agree(a_priv, b"\x00" * 31, "mask", "run/1")


def test_pairwise_masks_cancel_and_self_masks_come_off_with_the_seed():
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 5), "b": (7,)}
    inputs = [{k: rng.integers(0, 2**32, s, dtype=np.uint32) for k, s in shapes.items()} for _ in range(3)]
    keys = [generate_keypair() for _ in range(3)]
    selfs = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(3)]
    masked = []
    for i in range(3):
        y = {k: v.copy() for k, v in inputs[i].items()}
        add_mask(y, selfs[i], +1)
        for j in range(3):
            if j != i:
                add_mask(y, agree(keys[i][0], keys[j][1], "mask", "r"), +1 if i < j else -1)
        masked.append(y)
    total = {k: sum(m[k] for m in masked).astype(np.uint32) for k in shapes}
    for s in selfs:
        add_mask(total, s, -1)
    for k in shapes:
        assert np.array_equal(total[k], sum(x[k] for x in inputs).astype(np.uint32))


def test_the_key_stream_depends_on_the_seed_and_crosses_chunks():
    a, b = expand(b"\x01" * 32, [3, 2_000_000]), expand(b"\x02" * 32, [3, 2_000_000])
    assert a[1].dtype == np.uint32 and a[1].shape == (2_000_000,)
    assert not np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], expand(b"\x01" * 32, [3])[0])  # deterministic
    assert abs(a[1].astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    with pytest.raises(SecAggError, match="32 bytes"):
        expand(b"short", [1])


def test_fixed_point_round_trip_is_unbiased_and_the_worst_sum_does_not_overflow():
    sites, weight, clip = 50, 1000.0, 2.0
    scale = fixed_point_scale(sites, weight, clip)
    rng = np.random.default_rng(1)
    worst = np.full(10, weight * clip)
    total = sum(encode(worst, scale, rng) for _ in range(sites)).astype(np.uint32)
    assert np.all(decode(total, scale) > 0)  # no wrap to negative
    assert np.allclose(decode(total, scale), sites * weight * clip, rtol=0, atol=sites / scale)
    assert np.all(decode(sum(encode(-worst, scale, rng) for _ in range(sites)).astype(np.uint32), scale) < 0)
    x = rng.normal(0, 1e-3, 200_000)
    err = decode(encode(x, scale, rng), scale) - x
    assert np.abs(err).max() < 1 / scale
    assert abs(err.mean()) < 0.05 / scale  # stochastic rounding: no bias
    with pytest.raises(SecAggError, match="overflow"):
        fixed_point_scale(10**6, 1e4, 10.0)
    assert sites * (weight * clip * scale + 1) <= MAX_SIGNED
    assert quantisation_bound(sites, scale, 1000.0) == pytest.approx(sites / (scale * 1000.0))


def test_clip_bounds_the_whole_update_norm():
    deltas = {"a": np.full(4, 3.0), "b": np.full(1, 4.0)}
    clipped, norm = clip_l2(deltas, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 16))
    assert np.sqrt(sum((v**2).sum() for v in clipped.values())) == pytest.approx(1.0)
    same, _ = clip_l2(deltas, 100.0)
    assert np.array_equal(same["a"], deltas["a"])


def test_graph_is_symmetric_with_the_asked_degree_and_complete_when_small():
    assert neighbour_graph([3, 1, 2], 0, 0) == {1: (2, 3), 2: (1, 3), 3: (1, 2)}
    graph = neighbour_graph(range(100), 6, seed=7)
    assert all(len(vs) == 6 and u not in vs for u, vs in graph.items())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)
    assert graph != neighbour_graph(range(100), 6, seed=8)


def test_threshold_is_a_majority_and_shamir_rebuilds_from_that_many():
    assert share_threshold(5, 0.5) == 3 and share_threshold(5, 0.0) == 3 and share_threshold(5, 1.0) == 5
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[1:4]) == secret
    try:  # below the threshold the padding check usually fails; when it passes, the bytes are wrong
        assert combine_shares(shares[:2]) != secret
    except ValueError:
        pass
