"""Downstream metrics: each site computes them on its own test split, the server averages them.

A metric undefined at a site (AUROC of a label with one class there, HD95 with
an empty mask) is left out of that site's dict; :func:`aggregate_metrics` averages
each metric over the sites that have it. MONAI loads only when segmentation
metrics are computed.
"""

from __future__ import annotations

from fedmri.metrics.aggregate import aggregate_metrics
from fedmri.metrics.classification import (
    auroc_within_groups,
    binary_auroc,
    binary_metrics,
    multiclass_metrics,
    multilabel_metrics,
)
from fedmri.metrics.localisation import iou_per_sample, mean_iou
from fedmri.metrics.regression import mae
from fedmri.metrics.segmentation import dice_per_sample, segmentation_metrics

__all__ = [
    "aggregate_metrics",
    "auroc_within_groups",
    "binary_auroc",
    "binary_metrics",
    "dice_per_sample",
    "iou_per_sample",
    "mae",
    "mean_iou",
    "multiclass_metrics",
    "multilabel_metrics",
    "segmentation_metrics",
]
