"""Central site-level DP against hand-computed clips, means and noise, from mock replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord
from opacus.accountants import RDPAccountant

from fedmri.errors import ConfigError
from fedmri.strategies import build_aggregator
from fedmri.strategies.site_dp import CentralSiteDP, central_epsilon, clip_update, run_central_epsilon

SHAPES = {"encoder/patch_embed.weight": (4, 3), "encoder/norm.bias": (3,), "logit_scale/value": ()}


def _current(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in SHAPES.items()}


def _direction(seed: int) -> dict[str, np.ndarray]:
    """A delta of L2 norm 1 over all keys."""
    rng = np.random.default_rng(seed)
    raw = {key: rng.normal(size=shape) for key, shape in SHAPES.items()}
    norm = np.sqrt(sum(float((v ** 2).sum()) for v in raw.values()))
    return {key: v / norm for key, v in raw.items()}


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _delta_of(record: ArrayRecord, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value.astype(np.float64) - current[key] for key, value in _numpy(record).items()}


def _norm(delta: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v ** 2).sum()) for v in delta.values())))


def _central(spec: str = "fedavg", clip_norm: float = 1.0, noise: float = 0.0, seed: int = 0) -> CentralSiteDP:
    return CentralSiteDP(build_aggregator({"name": spec}), clip_norm, noise, np.random.default_rng(seed))


def test_clip_update_bounds_the_norm_and_keeps_the_direction(record) -> None:
    # Prepare: a delta of norm 5 against a bound of 2.
    current, direction = _current(), _direction(1)
    reply = {key: (current[key] + 5.0 * direction[key]).astype(np.float32) for key in SHAPES}
    # Execute
    clipped, norm = clip_update(record(current), record(reply), 2.0)
    # Assert
    delta = _delta_of(clipped, current)
    assert norm == pytest.approx(5.0, rel=1e-6)
    assert _norm(delta) == pytest.approx(2.0, rel=1e-5)
    for key in SHAPES:
        np.testing.assert_allclose(delta[key], 2.0 * direction[key], atol=1e-6)
        assert clipped[key].dtype == "float32" and clipped[key].shape == SHAPES[key]


def test_clip_update_passes_a_small_update_unchanged(record) -> None:
    current, direction = _current(), _direction(2)
    reply = {key: (current[key] + 0.5 * direction[key]).astype(np.float32) for key in SHAPES}
    clipped, norm = clip_update(record(current), record(reply), 1.0)
    assert norm == pytest.approx(0.5, rel=1e-5)
    for key in SHAPES:
        np.testing.assert_array_equal(clipped[key].numpy(), reply[key])
    unchanged, zero = clip_update(record(current), record(current), 1.0)  # Flower's clip divides by this 0
    assert zero == 0.0 and all(np.array_equal(unchanged[k].numpy(), current[k]) for k in SHAPES)


def test_clip_update_leaves_integer_arrays_out_of_the_norm(record) -> None:
    current = {"w": np.zeros(3, np.float32), "steps": np.array(5, np.int64)}
    reply = {"w": np.array([3.0, 4.0, 0.0], np.float32), "steps": np.array(500, np.int64)}
    clipped, norm = clip_update(record(current), record(reply), 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["w"].numpy(), [0.6, 0.8, 0.0], rtol=1e-6)
    assert clipped["steps"].numpy() == 500


@pytest.mark.parametrize("change, named", [("missing", "encoder/norm.bias"), ("extra", "stray"),
                                           ("shape", "encoder/norm.bias")])
def test_clip_update_names_the_key_that_does_not_match(record, change: str, named: str) -> None:
    current = _current()
    reply = dict(current)
    if change == "missing":
        del reply[named]
    elif change == "extra":
        reply[named] = np.zeros(2, np.float32)
    else:
        reply[named] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=named):
        clip_update(record(current), record(reply), 1.0)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, float("nan")])
def test_clip_update_refuses_a_bad_clip_norm(record, clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(record(_current()), record(_current()), clip_norm)


def test_sites_are_weighted_equally_and_clipped(make_reply, record) -> None:
    # Prepare: site 1 claims 1000x the examples and moves by 50 (clipped to 1); the others move by 0.5.
    current = _current()
    moves = {1: (50.0, _direction(1)), 2: (0.5, _direction(2)), 3: (0.5, _direction(3))}
    replies = [make_reply(node, {k: (current[k] + scale * d[k]).astype(np.float32) for k in SHAPES},
                          num_examples=10_000 if node == 1 else 10, dino_loss=float(node))
               for node, (scale, d) in moves.items()]
    clipped_scale = {1: 1.0, 2: 0.5, 3: 0.5}
    expected = {k: current[k] + sum(clipped_scale[n] * moves[n][1][k] for n in moves) / 3 for k in SHAPES}
    # Execute
    arrays, metrics = _central(clip_norm=1.0).aggregate(1, record(current), replies)
    # Assert
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], atol=1e-6)
    assert metrics["dino_loss"] == pytest.approx(2.0) and metrics["site-dp-clipped"] == 1
    assert replies[0].content["metrics"]["num-examples"] == 10_000  # the replies are not modified


def test_central_noise_has_std_z_c_over_m(make_reply, record) -> None:
    # Prepare: 4 sites that do not move, one large tensor.
    current = {"w": np.random.default_rng(0).normal(size=200_000).astype(np.float32)}
    replies = [make_reply(node, current) for node in range(1, 5)]
    dp = _central(clip_norm=0.5, noise=1.2, seed=7)
    # Execute
    arrays, metrics = dp.aggregate(1, record(current), replies)
    # Assert
    noise = arrays["w"].numpy().astype(np.float64) - current["w"]
    assert metrics["site-dp-noise-std"] == pytest.approx(1.2 * 0.5 / 4)
    assert noise.std() == pytest.approx(1.2 * 0.5 / 4, rel=0.02)
    assert abs(noise.mean()) < 1e-3
    assert arrays["w"].dtype == "float32"


def test_central_noise_is_seeded_by_the_generator_passed_in(make_reply, record) -> None:
    current = _current()
    replies = [make_reply(node, current) for node in (1, 2)]
    runs = [_numpy(_central(noise=1.0, seed=seed).aggregate(1, record(current), replies)[0]) for seed in (3, 3, 4)]
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in SHAPES)
    assert not np.array_equal(runs[0]["encoder/patch_embed.weight"], runs[2]["encoder/patch_embed.weight"])


def test_no_reply_releases_nothing_new(record) -> None:
    current = _current()
    arrays, _ = _central(noise=1.0).aggregate(1, record(current), [])
    assert all(np.array_equal(arrays[k].numpy(), current[k]) for k in SHAPES)


@pytest.mark.parametrize("name, why", [("fedadam", "sqrt"), ("fedyogi", "sqrt"), ("fedmedian", "sensitivity"),
                                       ("fedtrimmedavg", "sensitivity")])
def test_central_dp_refuses_aggregators_it_cannot_account_for(name: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"fedavg or fedprox, not '{name}'.*{why}"):
        CentralSiteDP(build_aggregator({"name": name}), 1.0, 1.0, np.random.default_rng())


@pytest.mark.parametrize("clip_norm, noise", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1), (1.0, float("inf"))])
def test_central_dp_refuses_bad_settings(clip_norm: float, noise: float) -> None:
    with pytest.raises(ConfigError, match="clip_norm|noise_multiplier"):
        CentralSiteDP(build_aggregator({"name": "fedprox"}), clip_norm, noise, np.random.default_rng())


def test_central_dp_keeps_the_aggregator_interface() -> None:
    dp = CentralSiteDP(build_aggregator({"name": "fedprox", "proximal_mu": 0.1}), 1.0, 1.0, np.random.default_rng())
    assert dp.client_config() == {"proximal-mu": 0.1}
    arrays, meta = dp.state_dict()
    dp.load_state_dict(arrays, meta)
    assert meta["name"] == dp.name == "fedprox"


def test_central_epsilon_is_opacus_rdp_of_the_sampled_gaussian() -> None:
    history = [(1.1, 1.0, 3), (1.1, 0.25, 5), (0.9, 1.0, 2)]  # stages may differ in z
    accountant = RDPAccountant()
    for z, rate, rounds in history:
        for _ in range(rounds):
            accountant.step(noise_multiplier=z, sample_rate=rate)
    expected = accountant.get_epsilon(1e-5)
    assert central_epsilon(history, 1e-5) == pytest.approx(expected, abs=1e-6)


def test_central_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert central_epsilon([], 1e-5) == 0.0 == central_epsilon([(1.0, 1.0, 0)], 1e-5)
    assert central_epsilon([(1.0, 1.0, 5)], 1e-5) < central_epsilon([(1.0, 1.0, 10)], 1e-5)
    assert central_epsilon([(2.0, 1.0, 10)], 1e-5) < central_epsilon([(1.0, 1.0, 10)], 1e-5)
    assert central_epsilon([(1.0, 0.1, 10)], 1e-5) < central_epsilon([(1.0, 1.0, 10)], 1e-5)
    assert central_epsilon([(0.0, 1.0, 1)], 1e-5) == float("inf")


@pytest.mark.parametrize("args, match", [(([(1.0, 1.0, 1)], 0.0), "delta"), (([(1.0, 0.0, 1)], 1e-5), "sample rate"),
                                         (([(1.0, 1.5, 1)], 1e-5), "sample rate"), (([(1.0, 1.0, -1)], 1e-5), "rounds"),
                                         (([(-1.0, 1.0, 1)], 1e-5), "noise_multiplier")])
def test_central_epsilon_refuses_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        central_epsilon(*args)


def test_the_aggregator_accounts_its_released_rounds_and_keeps_them_over_a_resume() -> None:
    dp = CentralSiteDP(build_aggregator({"name": "fedavg"}), 1.0, 1.2, np.random.default_rng())
    dp.account(1.0)
    dp.account(0.5)
    arrays, meta = dp.state_dict()
    again = CentralSiteDP(build_aggregator({"name": "fedavg"}), 1.0, 1.2, np.random.default_rng())
    again.load_state_dict(arrays, meta)
    assert again.steps() == [(1.2, 1.0, 1), (1.2, 0.5, 1)]
    assert run_central_epsilon([again], 1e-5) == central_epsilon([(1.2, 1.0, 1), (1.2, 0.5, 1)], 1e-5) > 0


def test_a_fixed_denominator_keeps_the_noise_whoever_replies(make_reply, record) -> None:
    # Prepare: 4 sites expected, 2 replied, both moving by 0.5 along their own direction.
    current = {"w": np.zeros(200_000, dtype=np.float32)}
    step = {n: np.random.default_rng(n).normal(size=200_000) for n in (1, 2)}
    step = {n: (0.5 * s / np.linalg.norm(s)).astype(np.float32) for n, s in step.items()}
    replies = [make_reply(n, {"w": current["w"] + step[n]}) for n in (1, 2)]
    quiet, noisy = _central(clip_norm=1.0, noise=1e-9, seed=1), _central(clip_norm=1.0, noise=1.0, seed=2)
    for dp in (quiet, noisy):
        dp.expected_sites = 4.0
    # Execute
    mean, _ = quiet.aggregate(1, record(current), replies)
    arrays, metrics = noisy.aggregate(1, record(current), replies)
    # Assert: the sum over q N = 4, and noise z C / 4, not / 2.
    np.testing.assert_allclose(mean["w"].numpy(), (step[1] + step[2]) / 4, atol=1e-6)
    assert metrics["site-dp-noise-std"] == pytest.approx(1.0 / 4)
    assert (arrays["w"].numpy() - mean["w"].numpy()).std() == pytest.approx(1.0 / 4, rel=0.02)
