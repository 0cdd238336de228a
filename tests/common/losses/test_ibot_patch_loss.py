"""iBOT masked-patch loss with DINOv2's per-image weighting, against numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmri.losses import iBOTPatchLoss, masked_token_weights


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_loss_matches_per_image_average_of_masked_token_losses() -> None:
    rng = np.random.default_rng(0)
    masks = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)  # 3, 1, 0 masked
    m = int(masks.sum())
    s = rng.normal(size=(m, 6))
    t = rng.dirichlet(np.ones(6), size=m)
    # Reference: walk the images; each image's masked tokens are averaged, then
    # the images (including the one with none) are averaged.
    per_image, row = [], 0
    for b in range(3):
        terms = []
        for _ in range(int(masks[b].sum())):
            terms.append(-(t[row] * _log_softmax(s[row] / 0.1)).sum())
            row += 1
        per_image.append(np.mean(terms) if terms else 0.0)
    expected = np.mean(per_image)
    got = iBOTPatchLoss(6, student_temp=0.1)(
        torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(masks))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_masked_token_weights() -> None:
    masks = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    torch.testing.assert_close(masked_token_weights(masks), torch.tensor([0.5, 0.5, 1.0]))


def test_center_update_over_masked_tokens_and_noop_when_none() -> None:
    loss = iBOTPatchLoss(2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.2]]))
    loss.update_center(torch.zeros(0, 2))
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.2]]))


def test_teacher_targets_centre() -> None:
    loss = iBOTPatchLoss(3)
    loss.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    got = loss.teacher_targets(torch.tensor([[1.0, 0.0, -1.0]]), 0.1)
    torch.testing.assert_close(got, torch.full((1, 3), 1 / 3))


def test_row_count_must_match_masks() -> None:
    masks = torch.tensor([[True, True]])
    with pytest.raises(ValueError, match="masked rows"):
        iBOTPatchLoss(3)(torch.zeros(1, 3), torch.zeros(1, 3), masks)


def test_flags() -> None:
    assert iBOTPatchLoss.per_sample_decomposable is True
    assert iBOTPatchLoss(3, centering="sinkhorn_knopp").per_sample_decomposable is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(patch_out_dim=0), "patch_out_dim"), (dict(student_temp=-1.0), "student_temp"),
     (dict(center_momentum=-0.1), "center_momentum"), (dict(centering="none"), "centering")],
)
def test_illegal_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        iBOTPatchLoss(**({"patch_out_dim": 4} | kwargs))
