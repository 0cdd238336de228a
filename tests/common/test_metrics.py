"""Downstream metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, mean_absolute_error, roc_auc_score

from fedmri.metrics import (
    aggregate_metrics,
    auroc_within_groups,
    binary_auroc,
    binary_metrics,
    dice_per_sample,
    iou_per_sample,
    mae,
    mean_iou,
    multiclass_metrics,
    multilabel_metrics,
    segmentation_metrics,
)

SEEDS = [0, 1, 2, 3]


def _tied_probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities on a 0.1 grid, so that many scores tie."""
    return np.round(rng.random(shape), 1)


# -- classification ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = _tied_probs(rng, (60,)) + 0.3 * labels  # informative, with ties
    want = roc_auc_score(labels, scores)
    assert binary_auroc(scores, labels) == pytest.approx(want, abs=1e-12)
    # float32 can merge or split ties, so sklearn sees the same float32 scores.
    scores32 = torch.from_numpy(scores).float()
    want32 = roc_auc_score(labels, scores32.numpy())
    assert binary_auroc(scores32, torch.from_numpy(labels).bool()) == pytest.approx(want32, abs=1e-12)


def test_binary_auroc_all_tied_is_one_half() -> None:
    assert binary_auroc(np.full(6, 0.3), [0, 1, 0, 1, 1, 0]) == 0.5


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_binary_auroc_is_none_with_one_class(labels: list[int]) -> None:
    assert binary_auroc(np.linspace(0, 1, len(labels)), labels) is None


@pytest.mark.parametrize(("scores", "labels", "match"), [
    ([0.1, 0.2], [0, 1, 1], "same shape"),
    ([0.1, 0.2], [0, 2], "only 0 and 1"),
    ([0.1, float("nan")], [0, 1], "NaN"),
    ([[0.1, 0.2]], [[0, 1]], "1-D"),
])
def test_binary_auroc_rejects_bad_inputs(scores: list, labels: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_auroc(scores, labels)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = _tied_probs(rng, (40,))
    got = binary_metrics(torch.from_numpy(scores), torch.from_numpy(labels), threshold=0.5)
    pred = scores >= 0.5
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert got["f1"] == pytest.approx(f1_score(labels, pred))


def test_binary_metrics_leave_out_what_one_class_leaves_undefined() -> None:
    got = binary_metrics([0.1, 0.2, 0.3], [0, 0, 0])
    assert got == {"accuracy": 1.0}


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = ["tumour", "oedema", "infarct", "atrophy"]
    labels = rng.integers(0, 2, (50, 4))
    labels[:, 2] = 0  # no infarct at this site: its AUROC is undefined
    scores = _tied_probs(rng, (50, 4))
    scores[:, 2] = np.minimum(scores[:, 2], 0.4)  # and it is never predicted: no F1 either
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(labels), names)
    pred = scores >= 0.5

    assert "auroc/infarct" not in got
    per_label = {n: roc_auc_score(labels[:, j], scores[:, j]) for j, n in enumerate(names) if n != "infarct"}
    for n, want in per_label.items():
        assert got[f"auroc/{n}"] == pytest.approx(want)
    assert got["auroc_macro"] == pytest.approx(np.mean(list(per_label.values())))
    for j, n in enumerate(names):
        assert got[f"accuracy/{n}"] == pytest.approx(accuracy_score(labels[:, j], pred[:, j]))
    assert got["f1_micro"] == pytest.approx(f1_score(labels, pred, average="micro"))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro", labels=[0, 1, 3]))


def test_multilabel_metrics_with_one_class_everywhere_has_no_auroc() -> None:
    got = multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b"])
    assert got == {"accuracy/a": 1.0, "accuracy/b": 1.0}


@pytest.mark.parametrize(("scores", "names", "match"), [
    (np.full((4, 2), 0.5), ["a"], "2 label columns"),
    (np.full((4, 2), 0.5), ["a", "a"], "unique"),
    (np.full((4, 2), 0.5), ["a", "x/y"], "unique"),
    (np.full((4, 2), 2.0), ["a", "b"], "sigmoid"),
])
def test_multilabel_metrics_rejects_bad_inputs(scores: np.ndarray, names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(scores, np.zeros((4, 2)), names)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_within_groups_scores_each_label_among_the_groups_where_it_occurs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = np.array(["brain"] * 30 + ["knee"] * 20 + ["spine"] * 10)
    labels = np.zeros((60, 2), dtype=int)
    labels[:30, 0] = rng.integers(0, 2, 30)  # a brain finding
    labels[30:50, 1] = rng.integers(0, 2, 20)  # a knee finding
    labels[[0, 1], 0] = (1, 0)  # both classes among brains
    labels[[30, 31], 1] = (1, 0)
    scores = _tied_probs(rng, (60, 2))
    got = auroc_within_groups(scores, labels, list(groups), ["mass", "effusion"])

    brain, knee = groups == "brain", groups == "knee"
    want = {"mass": roc_auc_score(labels[brain, 0], scores[brain, 0]),
            "effusion": roc_auc_score(labels[knee, 1], scores[knee, 1])}
    assert got["auroc_in_group/mass"] == pytest.approx(want["mass"])
    assert got["auroc_in_group/effusion"] == pytest.approx(want["effusion"])
    assert got["auroc_in_group_macro"] == pytest.approx(np.mean(list(want.values())))


def test_auroc_within_groups_ignores_what_region_alone_separates() -> None:
    # Scores that only know the group: 10 of 12 pairs won over all series (the knees), chance within brains.
    groups = ["brain"] * 4 + ["knee"] * 4
    labels = np.array([[1], [0], [1], [0], [0], [0], [0], [0]])
    scores = np.array([[0.9]] * 4 + [[0.1]] * 4)
    assert multilabel_metrics(scores, labels, ["mass"])["auroc/mass"] == pytest.approx(10 / 12)
    assert auroc_within_groups(scores, labels, groups, ["mass"]) == {"auroc_in_group/mass": 0.5,
                                                                      "auroc_in_group_macro": 0.5}
    assert auroc_within_groups(scores, np.zeros((8, 1)), groups, ["mass"]) == {}
    with pytest.raises(ValueError, match="7 groups for 8 samples"):
        auroc_within_groups(scores, labels, groups[:7], ["mass"])


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = np.concatenate([np.arange(5), rng.integers(0, 5, 45)])  # every class present
    logits = np.round(rng.normal(size=(50, 5)), 1)
    logits[np.arange(50), targets] += 1.0
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    pred = logits.argmax(axis=1)
    want = {"accuracy": accuracy_score(targets, pred), "f1_macro": f1_score(targets, pred, average="macro"),
            "auroc_macro": roc_auc_score(targets, probs, multi_class="ovr")}
    for scores in (torch.from_numpy(logits).float(), probs):
        got = multiclass_metrics(scores, torch.from_numpy(targets), num_classes=5)
        assert got == pytest.approx(want, abs=1e-6)


def test_multiclass_auroc_skips_classes_absent_from_targets() -> None:
    rng = np.random.default_rng(7)
    targets = rng.integers(0, 3, 40)  # class 3 never occurs at this site
    probs = rng.dirichlet(np.ones(4), 40)
    got = multiclass_metrics(probs, targets, num_classes=4)
    want = np.mean([roc_auc_score(targets == c, probs[:, c]) for c in range(3)])
    assert got["auroc_macro"] == pytest.approx(want)
    assert got["f1_macro"] == pytest.approx(f1_score(targets, probs.argmax(1), average="macro"))


@pytest.mark.parametrize(("scores", "targets", "num_classes", "match"), [
    (np.zeros((3, 2)), [0, 1, 1], 1, "num_classes"),
    (np.zeros((3, 2)), [0, 1, 2], 2, "class indices"),
    (np.zeros((3, 3)), [0, 1, 1], 2, r"\(N, 2\)"),
])
def test_multiclass_metrics_rejects_bad_inputs(scores: np.ndarray, targets: list[int], num_classes: int,
                                               match: str) -> None:
    with pytest.raises(ValueError, match=match):
        multiclass_metrics(scores, targets, num_classes)


# -- regression, localisation ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_mae_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target, pred = rng.uniform(20, 90, 30), rng.uniform(20, 90, 30)
    assert mae(torch.from_numpy(pred), target) == pytest.approx(mean_absolute_error(target, pred))


def test_mae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mae([1.0, 2.0], [1.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_iou_matches_sklearn_jaccard(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.random((5, 1, 6, 6, 6)) > 0.6
    target = rng.random((5, 1, 6, 6, 6)) > 0.5
    want = np.mean([jaccard_score(t.ravel(), p.ravel()) for p, t in zip(pred, target)])
    assert mean_iou(torch.from_numpy(pred), target.astype(np.float32)) == pytest.approx(want)


def test_mean_iou_empty_masks() -> None:
    pred = np.zeros((3, 1, 4, 4, 4), bool)
    target = np.zeros((3, 1, 4, 4, 4), bool)
    target[1, 0, 0, 0, :2] = True  # missed: 0
    pred[2, 0, 0, 0, :3] = True
    target[2, 0, 0, 0, 1:4] = True  # 2 of 4: 0.5
    assert mean_iou(pred, target) == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # sample 0: both empty, 1


# -- segmentation ---------------------------------------------------------------------


def _cubes(offset: int, axis: int = 0, side: int = 4, size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """A cube and the same cube shifted by ``offset`` voxels along ``axis``, as (1, 1, X, Y, Z)."""
    a = np.zeros((1, 1, size, size, size), bool)
    a[0, 0, 3:3 + side, 3:3 + side, 3:3 + side] = True
    return a, np.roll(a, offset, axis=2 + axis)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_shifted_cubes_is_the_shift_times_spacing(k: int) -> None:
    a, b = _cubes(k)
    assert segmentation_metrics(a, b)["hd95"] == pytest.approx(k)
    assert segmentation_metrics(a, b, spacing=2.0)["hd95"] == pytest.approx(2 * k)
    # Spacing is per axis, in the masks' axis order.
    assert segmentation_metrics(a, b, spacing=(2.0, 1.0, 1.0))["hd95"] == pytest.approx(2 * k)
    assert segmentation_metrics(*_cubes(k, axis=1), spacing=(2.0, 1.0, 1.0))["hd95"] == pytest.approx(k)


def test_dice_matches_hand_counts() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((4, 1, 6, 6, 6)) > 0.5
    target = rng.random((4, 1, 6, 6, 6)) > 0.4
    hand = [2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(pred, target)]
    got = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(target))
    assert got["dice"] == pytest.approx(np.mean(hand))
    assert got["hd95_undefined"] == 0

    a, b = _cubes(1)  # 64 voxels each, 48 shared
    assert segmentation_metrics(a, b)["dice"] == pytest.approx(2 * 48 / 128)


def _four_cases() -> tuple[np.ndarray, np.ndarray]:
    """Predicted and target masks of four samples: a shifted pair, both empty, a miss, a false alarm."""
    a, b = _cubes(2)
    empty = np.zeros_like(a)
    return np.concatenate([a, empty, empty, a]), np.concatenate([b, empty, b, empty])


def test_segmentation_empty_mask_conventions() -> None:
    pred, target = _four_cases()
    got = segmentation_metrics(pred, target)
    assert got["dice"] == pytest.approx((2 * 32 / 128 + 1.0 + 0.0 + 0.0) / 4)
    assert got["hd95"] == pytest.approx((2.0 + 0.0) / 2)  # the two undefined ones are left out
    assert got["hd95_undefined"] == 2

    a, empty = pred[:1], pred[1:2]
    got = segmentation_metrics(empty, a)
    assert got == {"dice": 0.0, "hd95_undefined": 1}


def test_per_sample_dice_and_iou_are_what_the_means_average() -> None:
    # The scores a patient bootstrap resamples (fedmri.heads.intervals.series_mean_intervals).
    pred, target = _four_cases()
    dice = dice_per_sample(pred, target)
    assert dice.shape == (4,) and dice == pytest.approx([2 * 32 / 128, 1.0, 0.0, 0.0])
    assert dice.mean() == pytest.approx(segmentation_metrics(pred, target)["dice"])
    iou = iou_per_sample(pred, target)
    assert iou == pytest.approx([32 / 96, 1.0, 0.0, 0.0]) and iou.mean() == pytest.approx(mean_iou(pred, target))
    with pytest.raises(ValueError, match="same shape"):
        dice_per_sample(pred, target[:2])


_MASK = np.zeros((1, 1, 4, 4, 4))


@pytest.mark.parametrize(("pred", "target", "spacing", "match"), [
    (np.zeros((2, 1, 4, 4, 4)), _MASK, None, "same shape"),
    (np.zeros((1, 2, 4, 4, 4)), np.zeros((1, 2, 4, 4, 4)), None, r"\(N, 1, X"),
    (np.full((1, 1, 4, 4, 4), 0.7), _MASK, None, "only 0 and 1"),
    (_MASK, _MASK, (1.0, 2.0), "spacing"),
    (_MASK, _MASK, -1.0, "spacing"),
])
def test_segmentation_metrics_rejects_bad_inputs(pred: np.ndarray, target: np.ndarray, spacing, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        segmentation_metrics(pred, target, spacing=spacing)


# -- aggregation ----------------------------------------------------------------------


def test_site_metrics_are_weighted_by_num_examples_and_counts_are_summed() -> None:
    got = aggregate_metrics([{"num-examples": 1, "loss": 1.0}, {"num-examples": 3, "loss": 3.0, "x": 2.0}])
    assert got["num-examples"] == 4 and math.isclose(got["loss"], 2.5) and got["x"] == 2.0
    # Counts of the series behind a figure add up over the sites, like num-examples.
    got = aggregate_metrics([{"num-examples": 4, "dense-examples": 3}, {"num-examples": 6, "dense-examples": 6}])
    assert got["dense-examples"] == 9


def test_a_metric_a_site_lacks_or_reports_as_nan_is_averaged_over_the_others() -> None:
    got = aggregate_metrics([{"num-examples": 10, "auroc": 0.8}, {"num-examples": 30, "auroc": float("nan")},
                             {"num-examples": 30}])
    assert got["auroc"] == 0.8 and got["num-examples"] == 70
    assert "dice" not in aggregate_metrics([{"num-examples": 1, "dice": float("nan")}])
    # Weights of 0 (sites that scored no series): the plain mean.
    assert aggregate_metrics([{"num-examples": 0, "x": 1.0}, {"num-examples": 0, "x": 3.0}])["x"] == 2.0
