"""Patient-bootstrap intervals of the heads' figures that are means of per-series scores (Dice, mIoU)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.heads.intervals import HEADLINE, series_mean_intervals


def test_a_mean_of_series_scores_gets_an_interval_around_it_that_narrows_with_patients() -> None:
    rng = np.random.default_rng(0)

    def width(n_patients: int) -> float:
        patients = [f"p{i // 2}" for i in range(2 * n_patients)]  # two series per patient
        dice = rng.uniform(0.0, 1.0, 2 * n_patients)
        got = series_mean_intervals({"dice": dice}, patients, n_boot=300, seed=1)
        assert got["dice_ci_low"] <= dice.mean() <= got["dice_ci_high"]
        return got["dice_ci_high"] - got["dice_ci_low"]

    assert width(80) < width(10)
    assert HEADLINE["segmentation"] == ("dice",) and HEADLINE["anomaly"] == ("miou",)


def test_the_same_scores_and_seed_give_the_same_interval_and_constant_scores_a_point() -> None:
    patients = ["a", "a", "b", "c", "d"]
    scores = {"miou": np.array([0.1, 0.3, 0.9, 0.5, 0.2])}
    assert series_mean_intervals(scores, patients, seed=3) == series_mean_intervals(scores, patients, seed=3)
    flat = series_mean_intervals({"dice": np.ones(5)}, patients, n_boot=50)
    assert flat == {"dice_ci_low": 1.0, "dice_ci_high": 1.0}
    assert series_mean_intervals({}, patients) == {}


def test_scores_that_are_not_one_per_series_are_refused() -> None:
    with pytest.raises(ValueError, match=r"one per series, \(3,\)"):
        series_mean_intervals({"dice": np.ones(2)}, ["a", "b", "c"])
