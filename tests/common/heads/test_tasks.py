"""Findings scored per sequence family: which sequences carry each finding for the model."""

from __future__ import annotations

import torch

from fedmri.heads.tasks import TASKS

FINDINGS = TASKS["findings"]


def _brains(n_per_family: int = 20) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    # Brain series, half with the first finding; its score is exact on FLAIR and reversed on T1.
    g = torch.Generator().manual_seed(0)
    families = ["FLAIR"] * n_per_family + ["T1"] * n_per_family
    target = torch.zeros(len(families), len(FINDINGS.classes))
    target[::2, 0] = 1.0
    scores = torch.randn(len(families), len(FINDINGS.classes), generator=g)
    scores[:n_per_family, 0] = target[:n_per_family, 0]
    scores[n_per_family:, 0] = -target[n_per_family:, 0]
    return scores, target, ["brain"] * len(families), families


def test_each_family_is_scored_on_its_own_series() -> None:
    scores, target, regions, families = _brains()
    known = torch.ones(len(families), dtype=torch.bool)
    code = FINDINGS.classes[0]
    by_family = FINDINGS.sequence_metrics(scores, target, known, regions, families)
    assert by_family[f"auroc_in_region/{code}@FLAIR"] == 1.0
    assert by_family[f"auroc_in_region/{code}@T1"] == 0.0
    # Pooled over both families, the finding is at chance: the split is what shows where it is seen.
    assert FINDINGS.region_metrics(scores, target, known, regions)[f"auroc_in_region/{code}"] == 0.5
    flair = torch.arange(20)
    expected = FINDINGS.region_metrics(scores[flair], target[flair], known[flair], regions[:20])
    assert {k: by_family[f"{k}@FLAIR"] for k in expected} == expected


def test_unknown_rows_and_one_class_families_give_no_figure() -> None:
    scores, target, regions, families = _brains()
    known = torch.ones(len(families), dtype=torch.bool)
    known[20:] = False  # no T1 series has a label
    by_family = FINDINGS.sequence_metrics(scores, target, known, regions, families)
    assert by_family and all(k.endswith("@FLAIR") for k in by_family)
    assert FINDINGS.sequence_metrics(scores, torch.zeros_like(target), known, regions, families) == {}
    assert TASKS["sequence"].sequence_metrics(scores, target, known, regions, families) == {}
