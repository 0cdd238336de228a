"""Lesion segmentation: Dice and HD95 with MONAI's metrics, and their empty-mask conventions."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmri.metrics._inputs import as_binary, same_shape


def _check_spacing(spacing: float | Sequence[float] | None, spatial_dims: int) -> float | list[float] | None:
    if spacing is None:
        return None
    values = [float(spacing)] if np.isscalar(spacing) else [float(v) for v in spacing]  # type: ignore[union-attr]
    if len(values) not in (1, spatial_dims) or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be one positive number or {spatial_dims} of them (mm per voxel), got {spacing}")
    return values[0] if len(values) == 1 else values


def segmentation_metrics(pred_mask: Any, target_mask: Any,
                         spacing: float | Sequence[float] | None = None) -> dict[str, float]:
    """Mean Dice and mean HD95 over samples (``monai.metrics.compute_dice``, ``compute_hausdorff_distance``).

    Empty masks, per sample:

    - both empty: Dice 1 and HD95 0 (a correct "no lesion");
    - one empty: Dice 0, HD95 undefined (no surface to measure from). Such
      samples are left out of the HD95 mean and counted in ``hd95_undefined``;
      their failure already shows in Dice. An arbitrary penalty (the image
      diagonal, say) would make HD95 depend on the field of view.

    Args:
        pred_mask: (N, 1, X, Y, Z) binary prediction (bool or 0/1); 2-D
            (N, 1, X, Y) works too. Threshold probabilities first.
        target_mask: Binary target of the same shape.
        spacing: Voxel size in mm, one number or one per spatial axis, the same
            for all samples; None = 1 (HD95 in voxels). Default None.

    Returns:
        ``{"dice", "hd95", "hd95_undefined"}``; ``hd95`` is left out when no
        sample has it defined.

    Raises:
        ValueError: For shapes that differ or are not (N, 1, *spatial), values
            outside {0, 1}, or a bad spacing.
    """
    p = as_binary(pred_mask, "pred_mask")
    t = as_binary(target_mask, "target_mask")
    same_shape(p, t, "pred_mask and target_mask")
    if p.ndim not in (4, 5) or p.shape[0] == 0 or p.shape[1] != 1:
        raise ValueError(f"masks must be (N, 1, X, Y[, Z]) with N >= 1, got shape {p.shape}")
    spacing_ = _check_spacing(spacing, p.ndim - 2)

    from monai.metrics import compute_hausdorff_distance  # slow import: only when used

    pred = torch.from_numpy(p).float()  # N, 1, *S
    target = torch.from_numpy(t).float()  # N, 1, *S
    dice = _dice(pred, target)  # N

    p_any = p.reshape(p.shape[0], -1).any(axis=1)
    t_any = t.reshape(t.shape[0], -1).any(axis=1)
    both = torch.from_numpy(p_any & t_any)
    hd95 = torch.zeros(p.shape[0], dtype=torch.float64)  # both empty: 0
    if both.any():  # MONAI would warn about, and return NaN for, the empty ones
        with warnings.catch_warnings():
            # MONAI 1.5-1.6 passes its own deprecated argument to get_mask_edges on every call.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd = compute_hausdorff_distance(pred[both], target[both], include_background=True,
                                            percentile=95, spacing=spacing_)  # n_both, 1
        hd95[both] = hd[:, 0].double()
    defined = torch.from_numpy(p_any == t_any)

    out = {"dice": float(dice.mean()), "hd95_undefined": int((~defined).sum())}
    if defined.any():
        out["hd95"] = float(hd95[defined].mean())
    return out


def dice_per_sample(pred_mask: Any, target_mask: Any) -> np.ndarray:
    """Each sample's Dice (N,), with :func:`segmentation_metrics`' empty-mask convention; its mean is ``dice``.

    The per-series scores a bootstrap over patients resamples.

    Raises:
        ValueError: As :func:`segmentation_metrics`.
    """
    p = as_binary(pred_mask, "pred_mask")
    t = as_binary(target_mask, "target_mask")
    same_shape(p, t, "pred_mask and target_mask")
    if p.ndim not in (4, 5) or p.shape[0] == 0 or p.shape[1] != 1:
        raise ValueError(f"masks must be (N, 1, X, Y[, Z]) with N >= 1, got shape {p.shape}")
    return _dice(torch.from_numpy(p).float(), torch.from_numpy(t).float()).double().numpy()


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's Dice of (N, 1, *S) 0/1 masks, per sample (N,)."""
    from monai.metrics import compute_dice  # slow import: only when used

    # ignore_empty=False: both empty gives 1, one empty gives 0.
    return compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0]  # N
