"""Aggregation strategies for staged, grouped parameters (federation work)."""

from __future__ import annotations

from fedmri.strategies.validation import (
    ARRAYS_KEY,
    DEFAULT_NORM_FACTOR,
    METRICS_KEY,
    NUM_EXAMPLES,
    ValidationReport,
    norm_outliers,
    validate_metrics,
    validate_replies,
    validate_update,
)

__all__ = [
    "ARRAYS_KEY",
    "DEFAULT_NORM_FACTOR",
    "METRICS_KEY",
    "NUM_EXAMPLES",
    "ValidationReport",
    "norm_outliers",
    "validate_metrics",
    "validate_replies",
    "validate_update",
]
