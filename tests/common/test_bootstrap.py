"""Patient-resampled bootstrap intervals: coverage, clustering, pairing, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.metrics import binary_auroc
from fedmri.metrics.bootstrap import Interval, bootstrap_difference, bootstrap_interval, cluster_resamples


def test_resamples_draw_whole_patients() -> None:
    clusters = ["a", "a", "a", "b", "c", "c"]
    for rows in cluster_resamples(clusters, n_boot=50, seed=1):
        picked = [clusters[i] for i in rows]
        for name, size in (("a", 3), ("b", 1), ("c", 2)):
            assert picked.count(name) % size == 0  # a patient comes with all of its series, or not at all
        assert len(set(rows.tolist()) & {0, 1, 2}) in (0, 3)


def test_resamples_are_repeatable_and_seeded() -> None:
    clusters = [str(i // 2) for i in range(20)]
    a = cluster_resamples(clusters, 5, seed=3)
    b = cluster_resamples(clusters, 5, seed=3)
    c = cluster_resamples(clusters, 5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_interval_of_a_mean_covers_the_truth_about_95_percent() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        x = rng.normal(0.0, 1.0, size=40)
        iv = bootstrap_interval(lambda rows, x=x: float(x[rows].mean()), [str(i) for i in range(40)], n_boot=300,
                                seed=trial)
        assert iv is not None and iv.low <= iv.value <= iv.high
        hits += iv.low <= 0.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_clustered_rows_give_a_wider_interval_than_pretending_they_are_independent() -> None:
    rng = np.random.default_rng(1)
    patient_effect = np.repeat(rng.normal(0.0, 1.0, 20), 5)  # 5 series per patient share one value
    x = patient_effect + rng.normal(0.0, 0.1, 100)
    by_patient = bootstrap_interval(lambda r: float(x[r].mean()), [str(i // 5) for i in range(100)], n_boot=500)
    by_series = bootstrap_interval(lambda r: float(x[r].mean()), [str(i) for i in range(100)], n_boot=500)
    assert by_patient is not None and by_series is not None
    assert by_patient.clusters == 20 and by_series.clusters == 100 and by_patient.n == 100
    assert (by_patient.high - by_patient.low) > 1.7 * (by_series.high - by_series.low)


def test_paired_difference_is_significant_where_the_separate_intervals_overlap() -> None:
    rng = np.random.default_rng(2)
    y = rng.random(60) < 0.5
    base = rng.normal(0.0, 1.0, 60) + 0.8 * y
    better = base + 0.6 * y  # the same series, a bit better on every positive
    patients = [str(i) for i in range(60)]
    a = bootstrap_interval(lambda r: binary_auroc(better[r], y[r]), patients)
    b = bootstrap_interval(lambda r: binary_auroc(base[r], y[r]), patients)
    d = bootstrap_difference(lambda r: binary_auroc(better[r], y[r]), lambda r: binary_auroc(base[r], y[r]), patients)
    assert a is not None and b is not None and d is not None
    assert a.low < b.high  # the two intervals overlap ...
    assert d.excludes(0.0) and d.value > 0  # ... but the paired difference is clearly above zero
    same = bootstrap_difference(lambda r: binary_auroc(base[r], y[r]), lambda r: binary_auroc(base[r], y[r]), patients)
    assert same is not None and not same.excludes(0.0)


def test_undefined_metric_gives_no_interval() -> None:
    patients = [str(i) for i in range(30)]

    def defined_on_all_rows_only(rows: np.ndarray) -> float | None:
        return 1.0 if np.array_equal(np.sort(rows), np.arange(30)) else None  # a resample almost never is

    assert bootstrap_interval(defined_on_all_rows_only, patients) is None
    assert bootstrap_interval(lambda r: None, ["a", "b"]) is None


def test_interval_format_and_json() -> None:
    iv = Interval(0.834, 0.71, 0.925, n=48, clusters=12)
    assert iv.format() == "0.83 [0.71, 0.93]"
    assert iv.to_json()["patients"] == 12 and iv.excludes(0.5) and not iv.excludes(0.8)


@pytest.mark.parametrize("kwargs, match", [({"n_boot": 0}, "n_boot"), ({"level": 1.0}, "level")])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_interval(lambda r: 0.0, ["a"], **kwargs)


def test_no_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="zero rows"):
        cluster_resamples([], 10)


def test_several_metrics_share_one_pass_and_match_the_single_metric_intervals() -> None:
    from fedmri.metrics.bootstrap import bootstrap_intervals

    rng = np.random.default_rng(5)
    x = rng.normal(size=50)
    patients = [str(i // 2) for i in range(50)]
    calls = []

    def both(rows: np.ndarray) -> dict[str, float]:
        calls.append(1)
        return {"mean": float(x[rows].mean()), "max": float(x[rows].max())}

    out = bootstrap_intervals(both, patients, n_boot=200, seed=9)
    assert len(calls) == 201  # the full data once, then each resample once
    single = bootstrap_interval(lambda r: float(x[r].mean()), patients, n_boot=200, seed=9)
    assert out["mean"] == single
    assert out["max"].low <= out["max"].value == pytest.approx(x.max())
