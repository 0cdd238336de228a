"""KoLeo against brute-force nearest neighbours."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedmri.losses import KoLeoLoss


def _reference(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        total += -np.log(nearest + eps)
    return total / len(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_nearest_neighbours(seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(7, 5))
    got = KoLeoLoss()(torch.tensor(x, dtype=torch.float32))
    assert got.item() == pytest.approx(_reference(x), rel=1e-4)


def test_nearest_neighbours_never_self() -> None:
    x = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    idx = KoLeoLoss.nearest_neighbours(x)
    for i, j in enumerate(idx.tolist()):
        assert j != i
        best = max((k for k in range(6) if k != i), key=lambda k: float(x[i] @ x[k]))
        assert float(x[i] @ x[j]) == pytest.approx(float(x[i] @ x[best]))


def test_spread_points_score_lower_and_duplicates_stay_finite() -> None:
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    bunched = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.3]])
    assert KoLeoLoss()(square) < KoLeoLoss()(bunched)
    dup = KoLeoLoss()(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.isfinite(dup)


def test_gradient_pushes_neighbours_apart() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]], requires_grad=True)
    loss = KoLeoLoss()
    before = loss(x)
    before.backward()
    with torch.no_grad():
        after = loss(x - 0.01 * x.grad)
    assert after < before


def test_flag_and_illegal_input() -> None:
    assert KoLeoLoss.per_sample_decomposable is False
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match="eps"):
        KoLeoLoss(eps=0.0)


def test_every_pair_permutation_invariant() -> None:
    x = torch.randn(5, 3)
    base = KoLeoLoss()(x)
    for perm in itertools.islice(itertools.permutations(range(5)), 5):
        torch.testing.assert_close(KoLeoLoss()(x[list(perm)]), base)
