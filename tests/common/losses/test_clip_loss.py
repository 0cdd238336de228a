"""Symmetric InfoNCE: against a hand computation, the queue, and its DP flag."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmri.losses import ClipLoss


def _features(b: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, e, generator=g), dim=-1)


def _reference(img: torch.Tensor, txt: torch.Tensor, scale: float, queue: torch.Tensor | None = None) -> float:
    # Written out term by term: -log softmax of the matching pair, both directions.
    b = img.shape[0]
    cands = txt if queue is None else torch.cat([txt, queue])
    i2t = sum(-(scale * img[i] @ cands.T).log_softmax(0)[i] for i in range(b)) / b
    t2i = sum(-(scale * txt[i] @ img.T).log_softmax(0)[i] for i in range(b)) / b
    return float((i2t + t2i) / 2)


def test_matches_the_written_out_formula() -> None:
    img, txt = _features(6, 8, 0), _features(6, 8, 1)
    loss = ClipLoss()(img, txt, torch.tensor(14.3))
    assert loss.item() == pytest.approx(_reference(img, txt, 14.3), rel=1e-5)


def test_matched_pairs_score_lower_than_shuffled_pairs() -> None:
    img = _features(8, 16, 0)
    txt = F.normalize(img + 0.05 * _features(8, 16, 1), dim=-1)
    loss_fn, scale = ClipLoss(), torch.tensor(math.exp(4.0))
    assert loss_fn(img, txt, scale) < 0.05 < loss_fn(img, txt.roll(1, 0), scale)


def test_queue_adds_image_to_text_negatives_only() -> None:
    img, txt = _features(4, 8, 0).requires_grad_(), _features(4, 8, 1)
    queue = _features(5, 8, 2).requires_grad_()
    loss_fn = ClipLoss()
    lpi, lpt = loss_fn.get_logits(img, txt, torch.tensor(10.0), text_queue=queue)
    assert lpi.shape == (4, 9) and lpt.shape == (4, 4)
    loss = loss_fn(img, txt, torch.tensor(10.0), text_queue=queue)
    assert loss.item() == pytest.approx(_reference(img.detach(), txt, 10.0, queue.detach()), rel=1e-5)
    loss.backward()
    assert queue.grad is None  # the queue is detached inside the loss


def test_an_empty_queue_changes_nothing() -> None:
    img, txt = _features(4, 8, 0), _features(4, 8, 1)
    scale = torch.tensor(10.0)
    assert torch.equal(ClipLoss()(img, txt, scale, text_queue=torch.zeros(0, 8)), ClipLoss()(img, txt, scale))


def test_is_declared_not_per_sample_decomposable() -> None:
    assert ClipLoss.per_sample_decomposable is False


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must both be"):
        ClipLoss()(_features(4, 8, 0), _features(3, 8, 1), torch.tensor(1.0))
