"""95% intervals of the heads' headline metrics, computed at the site by resampling its patients.

Per-series scores never leave a site, so the interval of a site's figure is
computed where the scores are: the site resamples its own patients
(:mod:`fedmri.metrics.bootstrap`) and sends two more aggregate numbers per
metric, ``<task>_<metric>_ci_low`` and ``_ci_high``. For a hospital scored on
its own (the held-out hospital) that is the interval of the reported figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedmri.heads.tasks import TaskSpec
from fedmri.metrics.bootstrap import CI_HIGH, CI_LOW, bootstrap_intervals

# The metrics of each task that the tables report, and so get an interval.
HEADLINE: dict[str, tuple[str, ...]] = {
    "findings": ("auroc_macro", "auroc_in_region_macro"),
    "sequence": ("accuracy",),
    "body_region": ("accuracy",),
    "age": ("mae",),
    "sex": ("auroc",),
    # The dense tasks' figures are means of per-series scores (fedmri.heads.dense.DenseTaskSpec.series_scores).
    "segmentation": ("dice",),
    "anomaly": ("miou",),
}


def task_intervals(spec: TaskSpec, scores: Tensor, target: Tensor, known: Tensor, regions: Sequence[str],
                   patients: Sequence[str], *, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """Interval bounds of ``spec``'s headline metrics over patient resamples of the known rows.

    Args:
        spec: the task.
        scores: (N, out_dim) head outputs.
        target, known: from :meth:`TaskSpec.targets`.
        regions: N body regions (for the in-region AUROC).
        patients: N patient pseudonyms (the resampling unit).
        n_boot: resamples.
        seed: resampling seed (the same at every evaluation, so figures are repeatable).

    Returns:
        ``<metric>_ci_low`` and ``<metric>_ci_high`` (unprefixed) for each
        headline metric defined on the rows and on most resamples.
    """
    names = HEADLINE.get(spec.name, ())
    rows = known.nonzero()[:, 0]
    if not names or rows.numel() == 0:
        return {}
    s, t = scores.detach().float()[rows], target[rows]
    k = known[rows]
    reg = [regions[i] for i in rows.tolist()]
    pats = [patients[i] for i in rows.tolist()]

    def headline(idx: np.ndarray) -> dict[str, float]:
        ix = torch.as_tensor(idx)
        scored = spec.metrics(s[ix], t[ix], k[ix])
        if "auroc_in_region_macro" in names:
            scored |= spec.region_metrics(s[ix], t[ix], k[ix], [reg[i] for i in idx])
        return {name: scored[name] for name in names if name in scored}

    out: dict[str, float] = {}
    for name, iv in bootstrap_intervals(headline, pats, n_boot=n_boot, seed=seed).items():
        out[name + CI_LOW], out[name + CI_HIGH] = iv.low, iv.high
    return out


def series_mean_intervals(scores: Mapping[str, np.ndarray], patients: Sequence[str], *, n_boot: int = 500,
                          seed: int = 0) -> dict[str, float]:
    """Interval bounds of figures that are means of per-series scores (a dense task's Dice, mIoU).

    Args:
        scores: ``{metric: (N,) score of each series}``, unprefixed; the figure is its mean.
        patients: N patient pseudonyms (the resampling unit).
        n_boot: resamples.
        seed: resampling seed.

    Returns:
        ``<metric>_ci_low`` and ``<metric>_ci_high`` (unprefixed) for each metric.

    Raises:
        ValueError: Scores that are not one per series.
    """
    if not scores or not len(patients):
        return {}
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
    for name, v in arrays.items():
        if v.shape != (len(patients),):
            raise ValueError(f"{name} holds scores of shape {v.shape}; expected one per series, ({len(patients)},)")
    out: dict[str, float] = {}
    means = bootstrap_intervals(lambda idx: {name: float(v[idx].mean()) for name, v in arrays.items()}, patients,
                                n_boot=n_boot, seed=seed)
    for name, iv in means.items():
        out[name + CI_LOW], out[name + CI_HIGH] = iv.low, iv.high
    return out
