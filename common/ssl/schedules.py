"""Training schedules as pure functions of progress (a fraction in [0, 1]).

The federation evaluates them on the server once per round and sends the
values with the round's instructions, so every site uses the same teacher
temperature, momentum, learning rate and weight decay (docs/architecture.md,
"Federation"). Progress rather than step counts: sites run different numbers
of local steps.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig


def progress(step: int, total: int) -> float:
    """Fraction of training done after ``step`` of ``total`` steps (or rounds).

    Raises:
        ValueError: If ``total < 1`` or ``step`` is outside [0, total].
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0 <= step <= total:
        raise ValueError(f"step must be in [0, {total}], got {step}")
    return step / total


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"training progress must be a fraction in [0, 1], got {fraction}")
    return float(fraction)


def cosine(fraction: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at 0 to ``end`` at 1."""
    fraction = _check_fraction(fraction)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * fraction))


def warmup_cosine(
    fraction: float, peak: float, end: float, warmup_fraction: float, warmup_start: float = 0.0
) -> float:
    """Linear from ``warmup_start`` to ``peak`` over ``warmup_fraction``, then cosine to ``end``."""
    fraction = _check_fraction(fraction)
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if fraction < warmup_fraction:
        return warmup_start + (peak - warmup_start) * fraction / warmup_fraction
    return cosine((fraction - warmup_fraction) / (1.0 - warmup_fraction), peak, end)


def teacher_temperature(fraction: float, warmup_temp: float = 0.04, temp: float = 0.07,
                        warmup_fraction: float = 0.3) -> float:
    """Teacher softmax temperature: linear warm-up, then constant (DINOv2)."""
    fraction = _check_fraction(fraction)
    if warmup_fraction <= 0.0 or fraction >= warmup_fraction:
        return temp
    return warmup_temp + (temp - warmup_temp) * fraction / warmup_fraction


def teacher_momentum(fraction: float, start: float = 0.992, end: float = 1.0) -> float:
    """EMA momentum of the teacher: cosine from ``start`` to ``end``."""
    return cosine(fraction, start, end)


def learning_rate(fraction: float, peak: float, end: float = 1e-6, warmup_fraction: float = 0.1) -> float:
    """Learning rate: linear warm-up from 0 to ``peak``, then cosine to ``end``."""
    return warmup_cosine(fraction, peak, end, warmup_fraction)


def weight_decay(fraction: float, start: float = 0.04, end: float = 0.4) -> float:
    """Weight decay: cosine from ``start`` to ``end`` (rising, as in DINOv2)."""
    return cosine(fraction, start, end)


def ssl_schedule(cfg: DictConfig, fraction: float) -> dict[str, float]:
    """Every per-round value of the self-supervised stage at ``fraction``.

    Args:
        cfg: A whole config or its ``ssl`` section.
        fraction: Training progress in [0, 1].

    Returns:
        ``{"lr", "weight_decay", "teacher_momentum", "teacher_temp"}``.
    """
    s = cfg.ssl if "ssl" in cfg else cfg
    return {
        "lr": learning_rate(fraction, s.lr, s.min_lr, s.warmup_fraction),
        "weight_decay": weight_decay(fraction, s.weight_decay, s.weight_decay_end),
        "teacher_momentum": teacher_momentum(fraction, s.momentum_teacher, s.final_momentum_teacher),
        "teacher_temp": teacher_temperature(fraction, s.warmup_teacher_temp, s.teacher_temp,
                                            s.warmup_teacher_temp_fraction),
    }
