"""Input checks shared by the metric functions: torch or numpy in, numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """``x`` (tensor, array or nested list) as a numpy array, checked for ``ndim`` dimensions."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # numpy has no bfloat16
        x = x.numpy()
    arr = np.asarray(x)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def as_scores(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """Finite real scores as float64."""
    arr = as_array(x, name, ndim)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def as_binary(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """Labels or masks in {0, 1} (bool, int or float) as a bool array."""
    arr = as_array(x, name, ndim)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
            raise ValueError(f"{name} must hold only 0 and 1 (threshold probabilities first), got values {bad.tolist()}")
        arr = arr.astype(bool)
    return arr


def same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability and must be in [0, 1], got {threshold}")


def check_probabilities(scores: np.ndarray, name: str) -> None:
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1], got range [{scores.min():.3g}, {scores.max():.3g}]; "
                         "apply a sigmoid to logits first")

