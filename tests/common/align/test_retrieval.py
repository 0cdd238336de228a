"""Retrieval metrics on hand-made similarity matrices with known ranks."""

from __future__ import annotations

import pytest
import torch

from fedmri.align import retrieval_metrics, retrieval_ranks
from fedmri.errors import InputError


def test_identity_is_perfect() -> None:
    m = retrieval_metrics(torch.eye(12))
    assert all(m[f"{d}_R@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["i2t_median_rank"] == m["t2i_median_rank"] == 1.0


def test_known_ranks_in_both_directions() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5],
                        [0.2, 0.3, 0.8],
                        [0.7, 0.2, 0.4]])
    # Rows (image->text): ranks 1, 2, 2.  Columns (text->image): ranks 1, 1, 3.
    m = retrieval_metrics(sim, ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(1 / 3) and m["i2t_R@2"] == 1.0 and m["i2t_median_rank"] == 2.0
    assert m["t2i_R@1"] == pytest.approx(2 / 3) and m["t2i_R@2"] == pytest.approx(2 / 3)
    assert m["t2i_median_rank"] == 1.0


def test_ties_are_broken_pessimistically() -> None:
    # Every candidate ties: the correct one is ranked behind all the wrong ones.
    m = retrieval_metrics(torch.zeros(4, 4), ks=(1, 3))
    assert m["i2t_R@1"] == m["i2t_R@3"] == m["t2i_R@1"] == 0.0
    assert m["i2t_median_rank"] == m["t2i_median_rank"] == 4.0
    ranks = retrieval_ranks(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[True, False, False]]))
    assert ranks.tolist() == [2]


def test_median_of_an_even_count_is_the_mean_of_the_middle_ranks() -> None:
    sim = torch.tensor([[1.0, 0.0], [1.0, 0.5]])  # image ranks 1 and 2
    assert retrieval_metrics(sim)["i2t_median_rank"] == 1.5


def test_index_targets_with_distractor_texts() -> None:
    sim = torch.tensor([[0.1, 0.2, 0.3],
                        [0.3, 0.4, 0.1]])
    # Image 0 -> text 2 (rank 1), image 1 -> text 0 (rank 2: text 1 scores higher).
    # Text 1 matches no image: a distractor only, not a text->image query.
    m = retrieval_metrics(sim, torch.tensor([2, 0]), ks=(1,))
    assert m["i2t_R@1"] == 0.5 and m["i2t_median_rank"] == 1.5
    assert m["t2i_R@1"] == 1.0  # text 0 -> image 1 (0.3 > 0.1), text 2 -> image 0 (0.3 > 0.1)


def test_relevance_matrix_counts_the_best_of_several_correct_candidates() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    relevant = torch.tensor([[True, False, True, False]])
    assert retrieval_ranks(sim, relevant).tolist() == [3]  # best correct 0.5, beaten by 0.9 and 0.7


@pytest.mark.parametrize("sim, targets, match", [
    (torch.zeros(2, 3), None, "square"),
    (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), None, "NaN"),
    (torch.zeros(2, 3), torch.tensor([0, 3]), "text indices"),
    (torch.zeros(2, 3), torch.zeros(3, 3, dtype=torch.bool), "must match"),
    (torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]), "at least one"),
    (torch.zeros(3), None, "2D"),
])
def test_bad_inputs_are_rejected(sim: torch.Tensor, targets: torch.Tensor | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        retrieval_metrics(sim, targets)


def test_bad_cut_off_is_rejected() -> None:
    with pytest.raises(InputError, match="cut-offs"):
        retrieval_metrics(torch.eye(3), ks=(0,))
