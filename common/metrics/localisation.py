"""Anomaly localisation: mean IoU between thresholded anomaly maps and target masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmri.metrics._inputs import as_binary, same_shape


def mean_iou(pred_masks: Any, target_masks: Any) -> float:
    """Mean over samples of ``|P & T| / |P | T|``.

    A sample whose prediction and target are both empty scores 1: the head
    correctly found no anomaly. One empty and the other not scores 0.

    Args:
        pred_masks: (N, ...) binary masks (bool or 0/1), e.g. (N, 1, X, Y, Z);
            threshold the anomaly probabilities first.
        target_masks: Binary masks of the same shape.

    Raises:
        ValueError: For shapes that differ, no samples, or values outside {0, 1}.
    """
    return float(iou_per_sample(pred_masks, target_masks).mean())


def iou_per_sample(pred_masks: Any, target_masks: Any) -> np.ndarray:
    """Each sample's IoU (N,), as :func:`mean_iou` scores it (both empty: 1); their mean is :func:`mean_iou`.

    Raises:
        ValueError: As :func:`mean_iou`.
    """
    p = as_binary(pred_masks, "pred_masks")
    t = as_binary(target_masks, "target_masks")
    same_shape(p, t, "pred_masks and target_masks")
    if p.ndim < 2 or p.shape[0] == 0:
        raise ValueError(f"masks must be (N, ...) with N >= 1, got shape {p.shape}")
    p = p.reshape(p.shape[0], -1)  # N, V
    t = t.reshape(t.shape[0], -1)  # N, V
    intersection = (p & t).sum(axis=1)
    union = (p | t).sum(axis=1)
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)  # N
