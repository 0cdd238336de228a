"""Sigmoid pair loss: against a hand computation, bias, queue, DP flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmri.losses import SigLipLoss


def _features(b: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, e, generator=g), dim=-1)


def _reference(img, txt, scale, bias, queue=None) -> float:
    b = img.shape[0]
    cands = txt if queue is None else torch.cat([txt, queue])
    total = 0.0
    for i in range(b):
        for j in range(cands.shape[0]):
            z = scale * float(img[i] @ cands[j]) + bias
            label = 1.0 if i == j else -1.0
            total += float(F.softplus(torch.tensor(-label * z)))  # -log sigmoid(label * z)
    return total / b


def test_matches_the_written_out_formula() -> None:
    img, txt = _features(5, 8, 0), _features(5, 8, 1)
    loss = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert loss.item() == pytest.approx(_reference(img, txt, 10.0, -10.0), rel=1e-5)


def test_orthonormal_pairs_give_the_closed_form_value() -> None:
    b, scale, bias = 4, 10.0, -5.0
    img = txt = torch.eye(b)
    expected = (b * F.softplus(torch.tensor(-(scale + bias))) + b * (b - 1) * F.softplus(torch.tensor(bias))) / b
    assert SigLipLoss()(img, txt, torch.tensor(scale), torch.tensor(bias)).item() == pytest.approx(expected.item())


def test_queued_texts_are_negatives() -> None:
    img, txt, queue = _features(3, 8, 0), _features(3, 8, 1), _features(4, 8, 2)
    loss_fn = SigLipLoss()
    assert loss_fn.get_logits(img, txt, torch.tensor(10.0), None, queue).shape == (3, 7)
    loss = loss_fn(img, txt, torch.tensor(10.0), torch.tensor(-10.0), text_queue=queue)
    assert loss.item() == pytest.approx(_reference(img, txt, 10.0, -10.0, queue), rel=1e-5)


def test_bias_gets_a_gradient() -> None:
    bias = torch.tensor(-10.0, requires_grad=True)
    SigLipLoss()(_features(4, 8, 0), _features(4, 8, 1), torch.tensor(10.0), bias).backward()
    assert bias.grad is not None and bias.grad.item() != 0.0


def test_is_declared_not_per_sample_decomposable() -> None:
    assert SigLipLoss.per_sample_decomposable is False


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must both be"):
        SigLipLoss()(_features(4, 8, 0), _features(4, 6, 1), torch.tensor(1.0))
