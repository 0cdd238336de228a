"""Classification metrics a site computes on its own test split: AUROC, accuracy, F1.

Conventions, shared by every function here:

- A metric that is undefined at this site is left out of the returned dict
  rather than set to NaN: AUROC when the site's targets hold one class only,
  F1 when a class is absent from both targets and predictions. The server's
  :func:`fedmri.metrics.weighted_mean` then averages over the sites that have it.
- Thresholded predictions are ``score >= threshold``.
- Inputs may be torch tensors or numpy arrays; outputs are python floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import softmax
from scipy.stats import rankdata

from fedmri.metrics._inputs import as_binary, as_scores, check_probabilities, check_threshold, same_shape


def binary_auroc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve from the Mann-Whitney U statistic.

    ``AUROC = (R+ - n+(n+ + 1)/2) / (n+ n-)`` with ``R+`` the sum of the
    positives' ranks; tied scores share their average rank, so a tied
    positive-negative pair counts 1/2 (as ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: (N,) real scores, higher meaning more likely positive.
        labels: (N,) targets in {0, 1}.

    Returns:
        The AUROC, or None when ``labels`` hold one class only (or none): the
        caller skips that label at that site.

    Raises:
        ValueError: For shapes that differ or are not 1-D, non-finite scores or labels outside {0, 1}.
    """
    s = as_scores(scores, "scores", ndim=1)
    y = as_binary(labels, "labels", ndim=1)
    same_shape(s, y, "scores and labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # average rank for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _f1(tp: int, fp: int, fn: int) -> float | None:
    """F1 = 2TP / (2TP + FP + FN); None when the class is absent from targets and predictions alike."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else None


def _counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """TP, FP, FN of bool arrays."""
    return int((pred & target).sum()), int((pred & ~target).sum()), int((~pred & target).sum())


def binary_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, accuracy and positive-class F1 of one binary task (sex).

    Args:
        scores: (N,) probabilities of the positive class.
        labels: (N,) targets in {0, 1}.
        threshold: Predicted positive when ``score >= threshold``. Default 0.5.

    Returns:
        ``{"auroc", "accuracy", "f1"}``; ``auroc`` is left out when the labels
        hold one class, ``f1`` when neither labels nor predictions hold a positive.
    """
    check_threshold(threshold)
    s = as_scores(scores, "scores", ndim=1)
    y = as_binary(labels, "labels", ndim=1)
    same_shape(s, y, "scores and labels")
    if s.size == 0:
        raise ValueError("binary_metrics needs at least one sample")
    check_probabilities(s, "scores")
    pred = s >= threshold
    out = {"accuracy": float((pred == y).mean())}
    if (auroc := binary_auroc(s, y)) is not None:
        out["auroc"] = auroc
    if (f1 := _f1(*_counts(pred, y))) is not None:
        out["f1"] = f1
    return out


def multilabel_metrics(scores: Any, labels: Any, names: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Per-label and averaged metrics of a multi-label task (diseases, findings).

    Args:
        scores: (N, L) probabilities, one sigmoid per label.
        labels: (N, L) targets in {0, 1}.
        names: L label names, unique, without ``/``; they key the per-label entries.
        threshold: Predicted positive when ``score >= threshold``. Default 0.5.

    Returns:
        - ``auroc/<name>``: for each label with both classes at this site;
        - ``auroc_macro``: the mean of those (left out when there are none);
        - ``accuracy/<name>``: for every label;
        - ``f1_micro``: F1 of the pooled counts of all labels (left out when no
          label has a positive in targets or predictions);
        - ``f1_macro``: mean F1 over the labels with a positive in targets or
          predictions, i.e. ``sklearn.metrics.f1_score(labels, pred,
          average="macro", labels=<those columns>)``; a label absent at this site
          and never predicted has no F1 rather than F1 = 0.
    """
    check_threshold(threshold)
    s = as_scores(scores, "scores", ndim=2)
    y = as_binary(labels, "labels", ndim=2)
    same_shape(s, y, "scores and labels")
    names = list(names)
    if len(names) != s.shape[1]:
        raise ValueError(f"got {len(names)} names for {s.shape[1]} label columns")
    if len(set(names)) != len(names) or any(not n or "/" in n or n == "sites" for n in names):
        raise ValueError(f"label names must be unique, non-empty, without '/' and not 'sites', got {names}")
    if s.shape[0] == 0:
        raise ValueError("multilabel_metrics needs at least one sample")
    check_probabilities(s, "scores")
    pred = s >= threshold  # N, L

    out: dict[str, float] = {}
    aurocs, f1s = [], []
    for j, name in enumerate(names):
        if (auroc := binary_auroc(s[:, j], y[:, j])) is not None:
            out[f"auroc/{name}"] = auroc
            aurocs.append(auroc)
        out[f"accuracy/{name}"] = float((pred[:, j] == y[:, j]).mean())
        if (f1 := _f1(*_counts(pred[:, j], y[:, j]))) is not None:
            f1s.append(f1)
    if aurocs:
        out["auroc_macro"] = float(np.mean(aurocs))
    if (f1_micro := _f1(*_counts(pred, y))) is not None:
        out["f1_micro"] = f1_micro
    if f1s:
        out["f1_macro"] = float(np.mean(f1s))
    return out


def auroc_within_groups(scores: Any, labels: Any, groups: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """AUROC of each label among the samples of the groups where it occurs.

    A finding's AUROC over every series mixes two skills: telling the body
    region where it can occur from the others, and telling diseased from
    healthy within that region. Random features already do the first well, so
    this keeps the second only. Label ``j`` is scored on the samples whose
    group holds at least one positive of ``j`` (effusion among knees, a mass
    among brains).

    Args:
        scores: (N, L) real scores.
        labels: (N, L) targets in {0, 1}.
        groups: N group names (body regions).
        names: L label names.

    Returns:
        ``auroc_in_group/<name>`` for each label with both classes among those
        samples, and ``auroc_in_group_macro``, their mean; {} when no label has.

    Raises:
        ValueError: For mismatched shapes or counts.
    """
    s = as_scores(scores, "scores", ndim=2)
    y = as_binary(labels, "labels", ndim=2)
    same_shape(s, y, "scores and labels")
    g = np.asarray([str(x) for x in groups])
    if g.shape != (s.shape[0],):
        raise ValueError(f"got {g.size} groups for {s.shape[0]} samples")
    if len(names) != s.shape[1]:
        raise ValueError(f"got {len(names)} names for {s.shape[1]} label columns")
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        keep = np.isin(g, np.unique(g[y[:, j]]))  # N: the groups with a positive of label j
        if (auroc := binary_auroc(s[keep, j], y[keep, j])) is not None:
            out[f"auroc_in_group/{name}"] = auroc
    if out:
        out["auroc_in_group_macro"] = float(np.mean(list(out.values())))
    return out


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that already are distributions stay; anything else is taken as logits."""
    if scores.min() >= 0.0 and scores.max() <= 1.0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
        return scores
    return softmax(scores, axis=1)


def multiclass_metrics(scores: Any, targets: Any, num_classes: int) -> dict[str, float]:
    """Accuracy, macro F1 and one-vs-rest macro AUROC of a single-label task (sequence, body region).

    Args:
        scores: (N, C) logits or probabilities. Rows that are non-negative and
            sum to 1 are taken as probabilities, anything else as logits and
            softmaxed: one-vs-rest AUROC ranks ``p(c | x)``, which a logit
            column alone does not give.
        targets: (N,) class indices in ``[0, num_classes)``.
        num_classes: C, at least 2.

    Returns:
        - ``accuracy``: of the argmax;
        - ``f1_macro``: mean F1 over the classes present in targets or
          predictions, as ``sklearn.metrics.f1_score(targets, pred, average="macro")``
          (whose default labels are that union);
        - ``auroc_macro``: mean one-vs-rest AUROC over the classes with both
          positives and negatives in ``targets`` (left out when there are none).
          With every class present this is ``roc_auc_score(targets, probs,
          multi_class="ovr")``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    s = as_scores(scores, "scores", ndim=2)
    t = as_scores(targets, "targets", ndim=1)
    if s.shape != (t.size, num_classes):
        raise ValueError(f"scores must be (N, {num_classes}) for {t.size} targets, got {s.shape}")
    if t.size == 0:
        raise ValueError("multiclass_metrics needs at least one sample")
    if (t != np.round(t)).any() or t.min() < 0 or t.max() >= num_classes:
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got values {np.unique(t)[:10].tolist()}")
    t = t.astype(np.int64)
    probs = _probabilities(s)
    pred = probs.argmax(axis=1)

    f1s = []
    for c in np.union1d(t, pred):
        f1 = _f1(*_counts(pred == c, t == c))
        assert f1 is not None  # c is in targets or predictions
        f1s.append(f1)
    out = {"accuracy": float((pred == t).mean()), "f1_macro": float(np.mean(f1s))}
    aurocs = [a for c in range(num_classes) if (a := binary_auroc(probs[:, c], t == c)) is not None]
    if aurocs:
        out["auroc_macro"] = float(np.mean(aurocs))
    return out
