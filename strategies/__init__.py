"""Aggregation strategies for staged, grouped parameters (federation work)."""

from __future__ import annotations

from fedmri.strategies.aggregator import AdaptiveAggregator, Aggregator
from fedmri.strategies.factory import STRATEGIES, build_aggregator
from fedmri.strategies.trimmed_avg import TrimmedAvg
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
    "AdaptiveAggregator",
    "Aggregator",
    "DEFAULT_NORM_FACTOR",
    "METRICS_KEY",
    "NUM_EXAMPLES",
    "STRATEGIES",
    "TrimmedAvg",
    "ValidationReport",
    "build_aggregator",
    "norm_outliers",
    "validate_metrics",
    "validate_replies",
    "validate_update",
]
