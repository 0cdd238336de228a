"""Confidence intervals for evaluation figures: the bootstrap, resampled by patient.

A figure measured on a few dozen series says little without its spread, and
series of one patient are not independent (a study's T1, T2 and FLAIR share
the lesion). So every interval here resamples *patients* with replacement
(the cluster bootstrap; Field & Welsh, JRSS-B 2007) and takes the percentile
interval of the metric over the resamples (Efron & Tibshirani 1993, ch. 13).
Two methods scored on the same series are compared on the same resamples
(paired), so their difference gets its own interval, and a difference whose
95% interval excludes zero is called significant.

Metrics are plain callables of an index array (the rows of one resample,
repeats included) that return a number, or ``None`` where the resample leaves
it undefined (an AUROC with one class): such resamples are skipped, and an
interval needs at least half of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Metric = Callable[[np.ndarray], "float | None"]
# Suffixes of a figure's interval bounds in a metrics dict: "<metric>_ci_low", "<metric>_ci_high".
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


@dataclass(frozen=True)
class Interval:
    """A figure with its bootstrap interval.

    Attributes:
        value: the metric on all rows.
        low: lower bound of the interval.
        high: upper bound.
        n: rows (series) behind ``value``.
        clusters: patients behind ``value``.
        level: coverage of the interval (0.95).
    """

    value: float
    low: float
    high: float
    n: int
    clusters: int
    level: float = 0.95

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside the interval (for a difference: significant at this level)."""
        return x < self.low or x > self.high

    def format(self, digits: int = 2) -> str:
        """``"0.83 [0.71, 0.92]"``."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_json(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "patients": self.clusters,
                "level": self.level}


def interval_bounds(metrics: Mapping[str, float], key: str) -> tuple[float, float] | None:
    """The ``(low, high)`` stored beside ``metrics[key]``, or None when no interval was computed."""
    low, high = metrics.get(key + CI_LOW), metrics.get(key + CI_HIGH)
    return None if low is None or high is None else (low, high)


def cluster_resamples(clusters: Sequence[str], n_boot: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``n_boot`` resamples that draw whole clusters (patients) with replacement.

    Args:
        clusters: the cluster (patient) of each row.
        n_boot: resamples to draw; >= 1.
        seed: the resamples are a function of it, so figures are repeatable.

    Raises:
        ValueError: for no rows or ``n_boot < 1``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    keys = np.asarray([str(c) for c in clusters])
    if keys.size == 0:
        raise ValueError("cannot resample zero rows")
    names, inverse = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(names))]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_boot, len(names)))
    return [np.concatenate([members[k] for k in row]) for row in draws]


def _interval(values: list[float], point: float, n: int, clusters: int, level: float, n_boot: int) -> Interval | None:
    if len(values) < max(1, n_boot // 2):
        return None  # the metric is undefined on most resamples: too few positives or negatives
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(point), float(low), float(high), n, clusters, level)


def bootstrap_interval(metric: Metric, clusters: Sequence[str], *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> Interval | None:
    """``metric`` on all rows, with its percentile interval over patient resamples.

    Args:
        metric: rows -> value or None.
        clusters: the patient of each row.
        n_boot: resamples.
        level: interval coverage in (0, 1).
        seed: resampling seed.

    Returns:
        The interval, or None when the metric is undefined on all rows or on
        more than half of the resamples.

    Raises:
        ValueError: for a level outside (0, 1), no rows or ``n_boot < 1``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rows = np.arange(len(clusters))
    point = metric(rows)
    if point is None or not math.isfinite(point):
        return None
    values = [v for idx in cluster_resamples(clusters, n_boot, seed) if (v := metric(idx)) is not None]
    return _interval(values, point, len(rows), len(set(map(str, clusters))), level, n_boot)


def bootstrap_intervals(metrics: Callable[[np.ndarray], dict[str, float]], clusters: Sequence[str], *,
                        n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Like :func:`bootstrap_interval` for a callable that returns several named metrics at once.

    Each resample is scored once, so metrics that share work (every AUROC of
    a multi-label head) cost one pass. A name missing from a resample's dict
    is undefined there.

    Returns:
        ``{name: interval}`` for each metric of the full-data dict with an interval.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    point = {k: v for k, v in metrics(np.arange(len(clusters))).items() if v is not None and math.isfinite(v)}
    if not point:
        return {}
    values: dict[str, list[float]] = {k: [] for k in point}
    for idx in cluster_resamples(clusters, n_boot, seed):
        scored = metrics(idx)
        for k in point:
            if scored.get(k) is not None:
                values[k].append(float(scored[k]))
    n, groups = len(clusters), len(set(map(str, clusters)))
    out = {k: _interval(values[k], point[k], n, groups, level, n_boot) for k in point}
    return {k: v for k, v in out.items() if v is not None}


def bootstrap_difference(metric_a: Metric, metric_b: Metric, clusters: Sequence[str], *, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0) -> Interval | None:
    """``metric_a - metric_b`` on the same rows, with a paired interval (the same resamples for both).

    Use it for two methods scored on the same series: the interval of the
    difference is much narrower than the two intervals' overlap suggests,
    because both move together with the case mix of a resample.

    Returns:
        The difference's interval (``excludes(0)``: significant), or None as
        for :func:`bootstrap_interval`.
    """
    def diff(idx: np.ndarray) -> float | None:
        a, b = metric_a(idx), metric_b(idx)
        return None if a is None or b is None else a - b

    return bootstrap_interval(diff, clusters, n_boot=n_boot, level=level, seed=seed)
