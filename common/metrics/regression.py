"""Regression metrics a site computes on its own test split (age)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmri.metrics._inputs import as_scores, same_shape


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error, in the unit of ``target`` (years, for age).

    Args:
        pred: Predictions of any shape, tensor or array.
        target: Targets of the same shape.

    Raises:
        ValueError: For shapes that differ, no samples, or non-finite values.
    """
    p = as_scores(pred, "pred")
    t = as_scores(target, "target")
    same_shape(p, t, "pred and target")
    if p.size == 0:
        raise ValueError("mae needs at least one sample")
    return float(np.abs(p - t).mean())
