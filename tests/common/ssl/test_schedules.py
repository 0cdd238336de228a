"""Schedules as pure functions of training progress."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmri.config import load_config
from fedmri.ssl import (
    cosine,
    learning_rate,
    progress,
    ssl_schedule,
    teacher_momentum,
    teacher_temperature,
    warmup_cosine,
    weight_decay,
)


def test_teacher_temperature_warms_up_linearly_then_holds() -> None:
    assert teacher_temperature(0.0) == pytest.approx(0.04)
    assert teacher_temperature(0.15) == pytest.approx(0.055)
    assert teacher_temperature(0.3) == pytest.approx(0.07)
    assert teacher_temperature(1.0) == pytest.approx(0.07)
    assert teacher_temperature(0.5, warmup_fraction=0.0) == pytest.approx(0.07)


def test_teacher_momentum_cosine() -> None:
    assert teacher_momentum(0.0) == pytest.approx(0.992)
    assert teacher_momentum(1.0) == pytest.approx(1.0)
    assert teacher_momentum(0.5) == pytest.approx(0.996)  # cosine midpoint is the mean
    f = 0.25
    assert teacher_momentum(f) == pytest.approx(1.0 - 0.008 * (1 + math.cos(math.pi * f)) / 2)
    values = [teacher_momentum(x) for x in np.linspace(0, 1, 21)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_learning_rate_warmup_then_cosine() -> None:
    assert learning_rate(0.0, 1e-3, 1e-6, 0.1) == 0.0
    assert learning_rate(0.05, 1e-3, 1e-6, 0.1) == pytest.approx(5e-4)
    assert learning_rate(0.1, 1e-3, 1e-6, 0.1) == pytest.approx(1e-3)
    assert learning_rate(0.55, 1e-3, 1e-6, 0.1) == pytest.approx((1e-3 + 1e-6) / 2)
    assert learning_rate(1.0, 1e-3, 1e-6, 0.1) == pytest.approx(1e-6)
    assert warmup_cosine(0.0, 2.0, 0.0, 0.5, warmup_start=1.0) == 1.0


def test_weight_decay_rises_on_a_cosine() -> None:
    assert weight_decay(0.0) == pytest.approx(0.04)
    assert weight_decay(0.5) == pytest.approx(0.22)
    assert weight_decay(1.0) == pytest.approx(0.4)
    assert cosine(0.5, 3.0, 1.0) == pytest.approx(2.0)


def test_progress_and_bounds() -> None:
    assert progress(3, 12) == 0.25
    with pytest.raises(ValueError, match="total"):
        progress(0, 0)
    with pytest.raises(ValueError, match="step"):
        progress(13, 12)
    for fn in (teacher_momentum, teacher_temperature, weight_decay):
        with pytest.raises(ValueError, match="fraction"):
            fn(1.5)
    with pytest.raises(ValueError, match="warmup_fraction"):
        learning_rate(0.5, 1.0, 0.0, 1.0)


def test_ssl_schedule_reads_the_config() -> None:
    cfg = load_config("tiny", overrides=["ssl.lr=0.01", "ssl.teacher_temp=0.06"])
    values = ssl_schedule(cfg, 1.0)
    assert set(values) == {"lr", "weight_decay", "teacher_momentum", "teacher_temp"}
    assert values["lr"] == pytest.approx(cfg.ssl.min_lr)
    assert values["teacher_temp"] == pytest.approx(0.06)
    assert ssl_schedule(cfg.ssl, 0.0)["teacher_momentum"] == pytest.approx(cfg.ssl.momentum_teacher)


def test_align_schedule_decays_from_lr_to_min_lr() -> None:
    from fedmri.align import align_schedule

    cfg = load_config("tiny", overrides=["align.lr=0.01", "align.min_lr=0.001", "align.weight_decay=0.2"])
    assert align_schedule(cfg, 0.0) == pytest.approx({"lr": 0.01, "weight_decay": 0.2})
    assert align_schedule(cfg, 0.5)["lr"] == pytest.approx(0.0055)
    assert align_schedule(cfg, 1.0)["lr"] == pytest.approx(0.001)
