"""Central site-level DP: the coordinator clips each site's update, averages them equally, adds noise.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"
(DP-FedAvg), as Flower's ``DifferentialPrivacyServerSideFixedClipping``
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): each site's delta
``reply - current`` over its floating arrays is clipped to L2 norm ``C`` (all
arrays together, FlatClip), the clipped updates are summed with equal weights
and divided by ``m``, and ``N(0, (z C / m)^2)`` is added to every coordinate.
In a run ``m = q N`` is fixed before any site answers (McMahan et al.'s fixed
denominator: ``N`` eligible sites, each drawn with probability ``q``, Poisson, by
the pipeline), so a site that declines or fails changes the sum, not the noise.
That is the Gaussian mechanism with noise multiplier ``z`` on the sum of the
clipped updates (L2 sensitivity ``C`` when one site's update is added or
removed), divided by ``m``; :func:`central_epsilon` accounts for it with Opacus'
RDP accountant of the sampled Gaussian mechanism.

Flower's helpers are used where they fit: ``get_norm``, ``clip_inputs_inplace``
and ``compute_stdv`` from ``flwr.supercore.differential_privacy``. Not its
``compute_clip_model_update`` (it divides by a zero norm when a site sends back
what it got, cannot skip integer arrays, leaves a 0-d parameter such as
``logit_scale`` unclipped, and does not give the norm) nor its
``add_gaussian_noise_inplace`` (it draws from NumPy's global generator).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from fedmri.accounting import rdp_epsilon
from fedmri.errors import ConfigError
from fedmri.strategies.aggregator import Aggregator, cast_like
from fedmri.strategies.updates import RoundUpdates, Update, weighted_mean

# Aggregators whose result is the (weighted) mean of the replies, so the equal-weight
# mean of clipped updates plus z C / m noise is the accounted Gaussian mechanism.
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")
_REFUSED = {
    "fedadam": "its server step divides the mean update by sqrt(v_t) per coordinate, so the noise would have "
               "to go on the mean update inside Flower's FedOpt step, before the moments see it",
    "fedmedian": "a coordinate-wise median of clipped updates does not have sensitivity C / m, so noise of "
                 "std z C / m does not give the accounted guarantee",
}
_REFUSED["fedyogi"] = _REFUSED["fedadam"]
_REFUSED["fedtrimmedavg"] = _REFUSED["fedmedian"].replace("median", "trimmed mean")


def clip_update(current: ArrayRecord, reply_arrays: ArrayRecord, clip_norm: float) -> tuple[ArrayRecord, float]:
    """``current`` plus the site's delta clipped to L2 norm ``clip_norm``, and the delta's norm before.

    Only floating arrays are clipped, jointly (one norm over all of them); other arrays
    (integer, bool) come back as the site sent them and are outside the DP guarantee.
    An update within the bound comes back exactly as sent. The norm and the scaling are
    computed in float64; the result has the site's dtypes.

    Args:
        current: The parameters shipped this round.
        reply_arrays: The site's updated parameters: the same keys, shapes and dtypes.
        clip_norm: ``C`` > 0.

    Returns:
        The clipped parameters in ``current``'s key order, and ``||reply - current||_2``.

    Raises:
        ValueError: ``clip_norm`` is not > 0, a key is missing on either side, a shape or dtype
            differs, or the delta is not finite (pass replies through ``validate_replies`` first).
    """
    _check_same_layout(current, reply_arrays)
    clipped, norm = clip_arrays({key: current[key].numpy() for key in current.keys()},
                                {key: reply_arrays[key].numpy() for key in reply_arrays.keys()}, clip_norm)
    if norm <= clip_norm:
        return ArrayRecord({key: reply_arrays[key] for key in current.keys()}), norm
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in clipped.items()}), norm


def clip_arrays(current: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """:func:`clip_update` on arrays already read: the clipped arrays in ``current``'s key order, and the norm.

    ``update`` must have ``current``'s keys, shapes and dtypes (validated replies do).
    """
    if not _is_number(clip_norm) or not clip_norm > 0:
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    floating = [key for key in current if np.issubdtype(current[key].dtype, np.floating)]
    start = {key: current[key].astype(np.float64) for key in floating}
    # np.asarray: a 0-d difference is a NumPy scalar, which clip_inputs_inplace could not scale in place.
    deltas = [np.asarray(update[key] - start[key]) for key in floating]
    norm = get_norm(deltas) if deltas else 0.0
    if not math.isfinite(norm):
        raise ValueError(f"the update's delta norm is {norm}: pass replies through validate_replies first")
    if norm <= clip_norm:
        return {key: update[key] for key in current}, norm
    clip_inputs_inplace(deltas, clip_norm)  # FlatClip: scales every delta by clip_norm / norm
    clipped = dict(zip(floating, deltas, strict=True))
    return {key: np.asarray(start[key] + clipped[key], dtype=current[key].dtype) if key in clipped else update[key]
            for key in current}, norm


class CentralSiteDP:
    """An :class:`~fedmri.strategies.Aggregator` (FedAvg or FedProx) made site-level DP by the coordinator.

    Drop-in for the aggregator it wraps: same ``aggregate``, ``client_config``,
    ``summary`` and checkpoint state. Each reply's arrays are clipped with
    :func:`clip_update`, every reply's ``num-examples`` is set to 1 in a copy (so the
    aggregate is the plain mean: weighted by its data, one large site could move the mean
    by up to C instead of C / m), and ``N(0, (z C / m)^2)`` is added
    to every floating coordinate of the mean.

    Args:
        aggregator: What ``build_aggregator`` made for ``fedavg`` or ``fedprox``.
        clip_norm: ``C`` > 0, the most L2 norm of one site's update (all floating arrays).
        noise_multiplier: ``z`` >= 0; 0 clips but gives no privacy (a warning says so).
        rng: The noise source. Seed it from OS entropy (``np.random.default_rng()``), never
            from the run's seed: whoever knows the seed can redraw the noise and subtract it.

    Raises:
        ConfigError: The aggregator is not FedAvg or FedProx (the message says why), or
            ``clip_norm`` / ``noise_multiplier`` is out of range.
    """

    def __init__(self, aggregator: Aggregator, clip_norm: float, noise_multiplier: float,
                 rng: np.random.Generator) -> None:
        if aggregator.name not in CENTRAL_DP_STRATEGIES:
            why = _REFUSED.get(aggregator.name, "it is not a mean of the replies")
            raise ConfigError(f"central site DP works with {' or '.join(CENTRAL_DP_STRATEGIES)}, not "
                              f"{aggregator.name!r}: {why}. Use strategy fedavg or fedprox, or site_dp mode local")
        if not _is_number(clip_norm) or not clip_norm > 0:
            raise ConfigError(f"central site DP clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not _is_number(noise_multiplier) or not noise_multiplier >= 0:
            raise ConfigError(f"central site DP noise_multiplier must be a finite number >= 0, "
                              f"got {noise_multiplier!r}")
        if noise_multiplier == 0:
            log(WARNING, "Central site DP with noise_multiplier 0 clips the updates but adds no noise: no privacy")
        self.aggregator = aggregator
        self.name = aggregator.name
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = rng
        # The sample rate (sites sampled / eligible) of every round this aggregator released.
        self.released: list[float] = []
        # The denominator of the mean, q N (sites expected under Poisson sampling at rate q of N
        # eligible; N when all are asked), set by the coordinator each round. None: the number of
        # updates, which depends on who replied (a site's decline would change the noise).
        self.expected_sites: float | None = None

    def account(self, sample_rate: float) -> None:
        """Count one more released round at ``sample_rate`` (the coordinator knows the rate; the
        aggregator does not see how many sites were eligible)."""
        self.released.append(float(sample_rate))

    def steps(self) -> list[tuple[float, float, int]]:
        """The released rounds as (noise multiplier, sample rate, 1) steps of the sampled Gaussian mechanism."""
        return [(self.noise_multiplier, q, 1) for q in self.released]

    def client_config(self) -> dict[str, int | float | str]:
        """The wrapped aggregator's round-config keys."""
        return self.aggregator.client_config()

    def summary(self) -> None:
        """Log the DP settings, then the aggregator's."""
        log(INFO, "Central site DP: clip norm %g, noise multiplier %g (std z C / m on the mean of m sites)",
            self.clip_norm, self.noise_multiplier)
        self.aggregator.summary()

    def aggregate(self, server_round: int, current: ArrayRecord,
                  replies: RoundUpdates | list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The noisy equal-weight mean of the clipped updates; the updates are not modified.

        Args:
            server_round: The round, for the log line.
            current: The parameters shipped this round.
            replies: The round's kept updates, or a list of accepted replies.

        Returns:
            The new values of the keys the updates carry, in ``current``'s dtypes, and the
            equal-weight mean of the sites' metrics plus ``site-dp-noise-std`` and
            ``site-dp-clipped`` (how many of the ``m`` updates were clipped). With no
            update, what the aggregator returns (``current`` unchanged, nothing released).
        """
        if isinstance(replies, list):
            with RoundUpdates.from_replies(current, replies) as updates:
                return self.aggregate(server_round, current, updates)
        if not len(replies):
            return self.aggregator.aggregate(server_round, current, replies)
        start = {key: current[key].numpy() for key in replies.keys}
        norms: list[float] = []

        def clip(_: Update, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            clipped, norm = clip_arrays(start, arrays, self.clip_norm)
            norms.append(norm)
            return clipped

        m = len(replies)
        mean = cast_like(current, replies.keys, weighted_mean(replies, weights=[1.0] * m, transform=clip))
        denominator = float(self.expected_sites) if self.expected_sites else float(m)
        if denominator != m:  # the sum of the clipped deltas over q N, not over the m that replied
            mean = ArrayRecord({key: Array(np.asarray(start[key] + (mean[key].numpy().astype(np.float64) - start[key])
                                                      * (m / denominator), dtype=mean[key].numpy().dtype))
                                if np.issubdtype(mean[key].numpy().dtype, np.floating) else mean[key]
                                for key in mean.keys()})
        metrics = self.aggregator.mean_metrics(replies, equal_weights=True)
        std = compute_stdv(self.noise_multiplier, self.clip_norm, denominator)
        noisy = {key: Array(_add_noise(mean[key].numpy(), std, self.rng)) for key in mean.keys()}
        clipped_count = sum(norm > self.clip_norm for norm in norms)
        log(INFO, "Round %d: central site DP clipped %d of %d updates to %g and added noise of std %.4g",
            server_round, clipped_count, m, self.clip_norm, std)
        metrics["site-dp-noise-std"] = std
        metrics["site-dp-clipped"] = clipped_count
        return ArrayRecord(noisy), metrics

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The wrapped aggregator's state and the released rounds (the noise source is not saved:
        it must stay secret)."""
        arrays, meta = self.aggregator.state_dict()
        return arrays, {**meta, _RELEASED: list(self.released)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore the wrapped aggregator's state and the released rounds."""
        meta = dict(meta)
        self.released = [float(q) for q in meta.pop(_RELEASED, [])]
        self.aggregator.load_state_dict(arrays, meta)


_RELEASED = "central-dp-released"


def central_epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of central site DP over a run: the sampled Gaussian mechanism, composed.

    Each round is one step of the sampled Gaussian mechanism with noise multiplier ``z``
    and sample rate ``q`` = sites sampled / sites eligible (1.0 when all take part), with
    add/remove-one-site adjacency (Mironov, Talwar and Zhang 2019, via Opacus'
    ``RDPAccountant``). Amplification by sampling assumes each site is drawn
    independently with probability ``q`` (Poisson), as McMahan et al. 2018 do.

    Args:
        history: ``(noise_multiplier, sample_rate, rounds)`` triples, in any order (the
            stages of a run may use different ``z``); ``z`` 0 gives ``inf``.
        delta: δ in (0, 1).

    Returns:
        ε; 0.0 when no round was aggregated.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    steps = []
    for noise_multiplier, rate, rounds in history:
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if not 0 < rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {rate!r}")
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds!r}")
        if rounds:  # Opacus gives a small ε > 0 for an entry of 0 steps
            steps.append((float(noise_multiplier), float(rate), int(rounds)))
    if not steps:
        return 0.0
    if any(z == 0 for z, _, _ in steps):
        return math.inf
    return rdp_epsilon(steps, delta)


class DistributedSiteDP:
    """The accounting of distributed site-level DP: the sites add the noise, the coordinator counts it.

    Under secure aggregation each of the ``m`` sites a round expects adds
    ``N(0, (z C)^2 / m)`` to its clipped update, so the sum the coordinator unmasks
    carries ``N(0, m' (z C)^2 / m)`` when ``m'`` of them contributed: the Gaussian
    mechanism on the sum at noise multiplier ``z sqrt(m' / m)``. Fewer contributors
    mean less noise, and sites that collude with the coordinator can take their own
    shares out: with ``c`` of them, ``z sqrt((m' - c) / m)`` (the README's threat
    model). The aggregation itself is the wrapped aggregator's: the mean of the
    secure sum, whose equal weights the sites set.

    Args:
        aggregator: What ``build_aggregator`` made for ``fedavg`` or ``fedprox``.
        noise_multiplier: ``z`` > 0 of the whole sum.
    """

    def __init__(self, aggregator: Aggregator, noise_multiplier: float) -> None:
        if aggregator.name not in CENTRAL_DP_STRATEGIES:
            raise ConfigError(f"distributed site DP works with {' or '.join(CENTRAL_DP_STRATEGIES)}, not "
                              f"{aggregator.name!r}")
        self.aggregator = aggregator
        self.name = aggregator.name
        self.noise_multiplier = float(noise_multiplier)
        self.released: list[tuple[float, float]] = []  # (effective noise multiplier, sample rate) per round

    def account(self, sample_rate: float, contributed: int, expected: int) -> float:
        """Count one released round; returns its effective noise multiplier ``z sqrt(m' / m)``."""
        effective = self.noise_multiplier * math.sqrt(min(contributed, expected) / expected)
        self.released.append((effective, float(sample_rate)))
        return effective

    def steps(self) -> list[tuple[float, float, int]]:
        """The released rounds as (noise multiplier, sample rate, 1) steps of the sampled Gaussian mechanism."""
        return [(z, q, 1) for z, q in self.released]

    def client_config(self) -> dict[str, int | float | str]:
        return self.aggregator.client_config()

    def summary(self) -> None:
        log(INFO, "Distributed site DP: noise multiplier %g on the sum, added by the sites in shares",
            self.noise_multiplier)
        self.aggregator.summary()

    def aggregate(self, server_round: int, current: ArrayRecord,
                  replies: RoundUpdates | list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        return self.aggregator.aggregate(server_round, current, replies)

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = self.aggregator.state_dict()
        return arrays, {**meta, _DISTRIBUTED: [list(r) for r in self.released]}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        meta = dict(meta)
        self.released = [(float(z), float(q)) for z, q in meta.pop(_DISTRIBUTED, [])]
        self.aggregator.load_state_dict(arrays, meta)


_DISTRIBUTED = "distributed-dp-released"


def run_central_epsilon(aggregators: Iterable[Any], delta: float) -> float:
    """ε at ``delta`` of every round that the run's :class:`CentralSiteDP` and :class:`DistributedSiteDP`
    aggregators released, in stage order."""
    return central_epsilon([step for agg in aggregators if isinstance(agg, (CentralSiteDP, DistributedSiteDP))
                            for step in agg.steps()], delta)


def _add_noise(mean: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``mean`` + N(0, std^2) per coordinate, drawn in float64, in ``mean``'s dtype; non-floats unchanged."""
    if std == 0 or not np.issubdtype(mean.dtype, np.floating):
        return mean
    noisy = mean.astype(np.float64) + rng.normal(0.0, std, size=mean.shape)
    return np.asarray(noisy, dtype=mean.dtype)


def _check_same_layout(current: ArrayRecord, update: ArrayRecord) -> None:
    for key in current.keys():
        if key not in update:
            raise ValueError(f"the update lacks {key!r}: pass replies through validate_replies first")
    for key in update.keys():
        if key not in current:
            raise ValueError(f"the update carries {key!r}, which was not shipped: pass replies through "
                             "validate_replies first")
        got, want = update[key], current[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(f"{key!r} is {got.dtype} {tuple(got.shape)}, expected {want.dtype} "
                             f"{tuple(want.shape)}: pass replies through validate_replies first")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
