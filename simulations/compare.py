"""Paired differences between modes on a held-out hospital: which of them are significant.

Two rows of the held-out table whose intervals overlap can still differ
significantly: the same patients make both figures, so a resample that flatters
one model tends to flatter the other. Only a holder of both models' per-series
scores can resample them together (:func:`fedmri.metrics.bootstrap.bootstrap_difference`).
In a deployment that holder is the hospital: it scores the encoders and heads it
was sent on its own series, and nothing per series leaves it. In a simulation
the held-out hospital's catalog is on this machine, so the runner does that
hospital's analysis: it loads each mode's exported encoder and heads, scores
every series of the hospital the way the evaluate stage does (same
preprocessed volumes, same pooling, same metrics), and keeps only the
differences.

Each difference is ``federated - <mode>`` with a 95% interval over resamples of
the hospital's patients; it is significant when the interval leaves out 0. For
``local`` (one model per site) the other side is the mean of the local models'
figures on each resample, as the table's ``local`` row is their mean. The
ceiling scores findings only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmri.errors import InputError
from fedmri.metrics.bootstrap import Interval, bootstrap_difference

# metric name (as in the tables) -> (task, key of the task's metrics, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "findings_auroc_in_region_macro": ("findings", "auroc_in_region_macro", True),
    "body_region_accuracy": ("body_region", "accuracy", True),
    "age_mae": ("age", "mae", False),
    "sex_auroc": ("sex", "auroc", True),
}
BASELINE = "federated"


@dataclass
class Hospital:
    """One held-out hospital's series, in catalog order, and what scoring needs."""

    name: str
    dataset: Any  # fedmri.data.dataset.SeriesDataset
    series: list[str]  # "<catalog>/<series row id>", as fedmri.simulations.ceiling.Split names them
    patients: list[str]
    regions: list[str]

    @classmethod
    def load(cls, catalog: str | Path, split: str | None, name: str | None = None) -> Hospital:
        """The series of ``split`` (None: all) in a catalog folder; ``name`` defaults to the folder's."""
        from fedmri.data.dataset import SeriesDataset

        catalog = Path(catalog)
        dataset = SeriesDataset(catalog, split)
        rows = dataset.rows
        return cls(name or catalog.name, dataset, [f"{catalog.name}/{r['meta']['series_id']}" for r in rows],
                   [str(r["meta"]["patient_id"]) for r in rows], [str(r["meta"]["body_region"]) for r in rows])


@torch.no_grad()
def score_export(folder: str | Path, hospital: Hospital, batch_size: int = 8) -> dict[str, Tensor]:
    """Every MLP task head's outputs (N, out_dim) on the hospital's series, from an export folder.

    The lesion heads (segmentation, anomaly) read patch tokens, not the pooled
    feature, and have no paired difference here: their figures keep the interval
    the hospital's evaluate stage sent.

    Raises:
        InputError: A folder without an encoder or heads export.
    """
    from fedmri.export import load_encoder, read_export_config
    from fedmri.heads.export import load_heads
    from fedmri.heads.mlp import pool_features
    from fedmri.heads.tasks import task_outputs

    folder = Path(folder)
    model = load_encoder(folder)
    encoder = getattr(model, "image_encoder", model)
    heads = load_heads(folder)
    pooling = str(read_export_config(folder)["extra"]["heads"]["config"]["pooling"])
    features = []
    for start in range(0, len(hospital.dataset), batch_size):
        images = torch.stack([hospital.dataset[i]["image"] for i in
                              range(start, min(start + batch_size, len(hospital.dataset)))]).float()
        features.append(pool_features(encoder(images), pooling).float())  # b, F
    x = torch.cat(features)
    return task_outputs(heads, x)


def _metric(hospital: Hospital, name: str) -> Callable[[Mapping[str, Tensor], np.ndarray], float | None]:
    from fedmri.heads.tasks import TASKS

    task, key, _ = METRICS[name]
    spec = TASKS[task]
    target, known = spec.targets(hospital.dataset.rows)

    def value(scores: Mapping[str, Tensor], idx: np.ndarray) -> float | None:
        if task not in scores:
            return None
        ix = torch.as_tensor(idx)
        s, t, k = scores[task][ix], target[ix], known[ix]
        got = spec.region_metrics(s, t, k, [hospital.regions[i] for i in idx]) if task == "findings" \
            else spec.metrics(s, t, k)
        return got.get(key)

    return value


def paired_differences(hospital: Hospital, scores: Mapping[str, Sequence[Mapping[str, Tensor]]], *,
                       baseline: str = BASELINE, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Interval]]:
    """``baseline - mode`` for every metric of :data:`METRICS` both sides have, with paired intervals.

    Args:
        hospital: The series the scores are of.
        scores: mode -> its models' task outputs ({task: (N, out_dim)}); one
            model for most modes, one per site for ``local``.
        baseline: The mode every other is compared with.
        n_boot: Patient resamples.
        seed: Resampling seed.

    Returns:
        {metric: {mode: interval of the difference}}; pairs with no figure are left out.
    """
    if baseline not in scores:
        return {}
    out: dict[str, dict[str, Interval]] = {}
    for name in METRICS:
        value = _metric(hospital, name)

        def mean_of(models: Sequence[Mapping[str, Tensor]]) -> Callable[[np.ndarray], float | None]:
            def metric(idx: np.ndarray) -> float | None:
                values = [v for v in (value(m, idx) for m in models) if v is not None]
                return float(np.mean(values)) if values else None
            return metric

        first = mean_of(scores[baseline])
        for mode, models in scores.items():
            if mode == baseline:
                continue
            iv = bootstrap_difference(first, mean_of(models), hospital.patients, n_boot=n_boot, seed=seed)
            if iv is not None:
                out.setdefault(name, {})[mode] = iv
    return out


def verdict(difference: Mapping[str, Any]) -> str:
    """How a difference of :func:`compare_modes` reads: federated better, worse, or not significant."""
    if not difference["significant"]:
        return "not significant"
    return "federated better" if difference["better"] else "federated worse"


def ceiling_outputs(hospital: Hospital, series: Sequence[str], probabilities: np.ndarray) -> dict[str, Tensor] | None:
    """The ceiling's findings scores in the hospital's row order; None unless it scored every series."""
    where = {s: i for i, s in enumerate(series)}
    if not all(s in where for s in hospital.series):
        return None
    order = [where[s] for s in hospital.series]
    return {"findings": torch.as_tensor(np.asarray(probabilities)[order], dtype=torch.float32)}


def compare_modes(hospital: Hospital, exports: Mapping[str, Sequence[Path]],
                  extra: Mapping[str, dict[str, Tensor]] | None = None, *, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Score each mode's exports on the hospital and return the differences as JSON.

    Args:
        hospital: The held-out hospital.
        exports: mode -> export folders (encoder + heads) of its models.
        extra: mode -> outputs computed elsewhere (the ceiling's findings).
        n_boot, seed: as :func:`paired_differences`.

    Returns:
        ``{"baseline": ..., "patients": ..., "series": ..., "differences":
        {metric: {mode: {value, low, high, n, patients, level, significant,
        better}}}}``, where ``better`` says whether the baseline is the better
        side of a significant difference (lower is better for ``age_mae``).
    """
    scores: dict[str, list[Mapping[str, Tensor]]] = {}
    for mode, folders in exports.items():
        got = []
        for folder in folders:
            try:
                got.append(score_export(folder, hospital))
            except InputError:  # a mode whose run has no heads export (no heads stage)
                continue
        if got:
            scores[mode] = got
    for mode, outputs in (extra or {}).items():
        scores[mode] = [outputs]
    differences = paired_differences(hospital, scores, n_boot=n_boot, seed=seed)
    table: dict[str, dict[str, Any]] = {}
    for name, by_mode in differences.items():
        higher = METRICS[name][2]
        for mode, iv in by_mode.items():
            significant = iv.excludes(0.0)
            table.setdefault(name, {})[mode] = iv.to_json() | {
                "significant": significant, "better": significant and ((iv.value > 0) == higher)}
    return {"baseline": BASELINE, "hospital": hospital.name, "series": len(hospital.series),
            "patients": len(set(hospital.patients)), "differences": table}
