"""DINO CLS-token loss, centring and Sinkhorn-Knopp against plain numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmri.losses import DINOClsTokenLoss, sinkhorn_knopp


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_loss_matches_explicit_loops() -> None:
    rng = np.random.default_rng(0)
    students = [rng.normal(size=(3, 5)) for _ in range(2)]
    teachers = [rng.dirichlet(np.ones(5), size=3) for _ in range(3)]
    expected = 0.0
    for s in students:
        for t in teachers:
            pair = 0.0
            for i in range(3):
                log_p = np.log(_softmax(s[i] / 0.1))
                pair += -sum(t[i, k] * log_p[k] for k in range(5))
            expected += pair / 3
    loss = DINOClsTokenLoss(5, student_temp=0.1)
    got = loss([torch.tensor(s, dtype=torch.float32) for s in students],
               [torch.tensor(t, dtype=torch.float32) for t in teachers])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_teacher_targets_centre_then_sharpen() -> None:
    loss = DINOClsTokenLoss(4)
    loss.center.copy_(torch.tensor([[0.1, -0.2, 0.0, 0.3]]))
    logits = torch.tensor([[1.0, 0.5, -0.5, 0.2], [0.0, 0.0, 0.0, 0.0]])
    got = loss.teacher_targets(logits, teacher_temp=0.05)
    c = np.array([0.1, -0.2, 0.0, 0.3])
    for i in range(2):
        np.testing.assert_allclose(got[i].numpy(), _softmax((logits[i].numpy() - c) / 0.05), rtol=1e-5)


def test_center_update_is_an_ema_of_the_batch_mean() -> None:
    loss = DINOClsTokenLoss(3, center_momentum=0.9)
    batches = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[0.0, 6.0, 0.0]])]
    center = np.zeros(3)
    for b in batches:
        loss.update_center(b)
        center = 0.9 * center + 0.1 * b.numpy().mean(0)
    np.testing.assert_allclose(loss.center[0].numpy(), center, rtol=1e-6)


def test_gradient_reaches_only_the_student() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.softmax(torch.randn(4, 6), -1)
    DINOClsTokenLoss(6)([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _sinkhorn_reference(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    q = np.exp(logits / temp).T  # K, M
    k, m = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(m):
            q[:, c] = q[:, c] / q[:, c].sum() / m
    return (q * m).T


def test_sinkhorn_knopp_matches_reference_and_balances() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    got = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.5, n_iterations=3).numpy()
    np.testing.assert_allclose(got, _sinkhorn_reference(logits, 0.5, 3), rtol=1e-4)
    np.testing.assert_allclose(got.sum(1), np.ones(6), rtol=1e-5)  # rows are distributions
    many = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.5, n_iterations=50).numpy()
    np.testing.assert_allclose(many.sum(0), np.full(4, 6 / 4), rtol=1e-3)  # prototypes balanced


def test_sinkhorn_option_is_used_and_flagged_not_decomposable() -> None:
    logits = torch.randn(5, 4)
    sk = DINOClsTokenLoss(4, centering="sinkhorn_knopp")
    torch.testing.assert_close(sk.teacher_targets(logits, 0.1), sinkhorn_knopp(logits, 0.1))
    assert sk.per_sample_decomposable is False
    assert DINOClsTokenLoss(4).per_sample_decomposable is True
    assert DINOClsTokenLoss.per_sample_decomposable is True


def test_per_sample_decomposable_holds() -> None:
    # With the centre fixed, the batch loss is the mean of one-sample losses.
    loss = DINOClsTokenLoss(5)
    loss.center.normal_()
    s, t_logits = torch.randn(4, 5), torch.randn(4, 5)
    t = loss.teacher_targets(t_logits, 0.04)
    whole = loss([s], [t])
    parts = [loss([s[i:i + 1]], [loss.teacher_targets(t_logits[i:i + 1], 0.04)]) for i in range(4)]
    torch.testing.assert_close(whole, torch.stack(parts).mean())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(out_dim=0), "out_dim"), (dict(student_temp=0.0), "student_temp"),
     (dict(center_momentum=1.0), "center_momentum"), (dict(centering="batch"), "centering")],
)
def test_illegal_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DINOClsTokenLoss(**({"out_dim": 4} | kwargs))
