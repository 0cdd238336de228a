"""Sample-level DP-SGD: per-sample gradients over all of a sample's crops, clipping,
noise, Poisson sampling, σ from a target ε, and the refusal of batch-coupled objectives."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import Tensor, nn
from torch.func import functional_call

from fedmri.client.privacy.dp_sgd import (
    clip_and_noise,
    dp_step,
    noise_for_epsilon,
    per_sample_grads,
    poisson_batch,
)

CROPS, DIM = 3, 4


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 2))


def multicrop_loss(model: nn.Module):
    """One sample = 3 crops; its term couples its own crops (distance of each to their mean)."""

    def loss(params: dict[str, Tensor], crops: Tensor) -> Tensor:
        z = functional_call(model, params, (crops,))  # CROPS, 2
        return (z - z.mean(0)).pow(2).sum() + z[0].sum()

    return loss


def samples(n: int, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(CROPS, DIM, generator=g) for _ in range(n)]


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("vectorized", [False, True])
def test_per_sample_grads_equal_a_manual_loop(vectorized: bool) -> None:
    model = tiny_mlp()
    loss, params, xs = multicrop_loss(model), params_of(model), samples(5)
    got = per_sample_grads(loss, params, xs, vectorized=vectorized)
    for i, x in enumerate(xs):
        model.zero_grad()
        loss(params, x).backward()
        for name, p in params.items():
            assert got[name].shape == (len(xs), *p.shape)
            torch.testing.assert_close(got[name][i], p.grad, atol=1e-6, rtol=0)


def test_per_sample_grads_of_no_samples_are_empty() -> None:
    model = tiny_mlp()
    got = per_sample_grads(multicrop_loss(model), params_of(model), [])
    assert all(g.shape[0] == 0 for g in got.values())


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def test_clipping_bounds_each_samples_contribution() -> None:
    model = tiny_mlp()
    loss, params = multicrop_loss(model), params_of(model)
    per = per_sample_grads(loss, params, samples(6))
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])  # from far below C to far above
    per = {n: g * scales.view(-1, *[1] * (g.dim() - 1)) for n, g in per.items()}
    C, B = 0.5, len(scales)
    summed = flat(clip_and_noise(per, C, 0.0, None, expected_batch_size=1))
    assert summed.norm() <= B * C + 1e-5
    huge = {n: g[:1] * 1e6 for n, g in per_sample_grads(loss, params, samples(1, seed=2)).items()}
    with_huge = {n: torch.cat([per[n], huge[n]]) for n in per}
    assert flat(huge).norm() > 100 * C
    moved = flat(clip_and_noise(with_huge, C, 0.0, None, expected_batch_size=1)) - summed
    assert moved.norm() <= C + 1e-5


def test_noise_std_is_sigma_times_c_over_expected_batch_size() -> None:
    sigma, C, B, coords, draws = 1.3, 0.7, 8, 50, 2000
    zeros = {"w": torch.zeros(3, coords)}
    g = torch.Generator().manual_seed(0)
    noise = torch.stack([clip_and_noise(zeros, C, sigma, g, B)["w"] for _ in range(draws)])
    n = noise.numel()
    expected = sigma * C / B
    # The sample std of n normals has standard error ≈ std / sqrt(2n); the mean ≈ std / sqrt(n).
    assert abs(noise.std().item() - expected) < 3 * expected / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 3 * expected / math.sqrt(n)


def test_poisson_batch_size_mean_is_q_n() -> None:
    n, q, trials = 1000, 0.1, 200
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([len(poisson_batch(n, q, g)) for _ in range(trials)], dtype=torch.float64)
    assert abs(sizes.mean().item() - q * n) < 3 * math.sqrt(n * q * (1 - q) / trials)
    batch = poisson_batch(n, q, torch.Generator().manual_seed(1))
    assert batch == sorted(set(batch)) and all(0 <= i < n for i in batch)
    assert poisson_batch(3, 1e-9, torch.Generator().manual_seed(0)) == []


@pytest.mark.parametrize(("eps", "q", "steps"), [(1.0, 0.01, 1000), (3.0, 0.02, 500)])
def test_noise_for_epsilon_meets_the_target_under_opacus_rdp(eps: float, q: float, steps: int) -> None:
    delta = 1e-5
    sigma = noise_for_epsilon(eps, delta, q, steps)
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    assert abs(accountant.get_epsilon(delta) - eps) < 1e-2


def test_coupled_objective_is_refused_and_says_why() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="couple samples") as info:
        dp_step(multicrop_loss(model), params_of(model), samples(2), max_grad_norm=1.0, noise_multiplier=1.0,
                expected_batch_size=2, generator=None, per_sample_decomposable=False)
    assert "no valid" in str(info.value) and "koleo" in str(info.value).lower()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"expected_batch_size": 0}, "expected_batch_size"),
])
def test_clip_and_noise_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "generator": None, "expected_batch_size": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        clip_and_noise({"w": torch.zeros(2, 3)}, **args)


def test_bad_sampling_and_accounting_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batch(10, 1.5)
    with pytest.raises(ValueError, match="number of samples"):
        clip_and_noise({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, 1.0, 0.0, None, 2)
    with pytest.raises(ValueError, match="steps"):
        noise_for_epsilon(1.0, 1e-5, 0.01, 0)


def test_dp_training_lowers_a_simple_loss() -> None:
    torch.manual_seed(0)
    n, q = 256, 0.25
    true_w = torch.tensor([2.0, -1.0, 0.5, 3.0])
    x = torch.randn(n, CROPS, DIM)
    y = x @ true_w  # n, CROPS
    model = nn.Linear(DIM, 1)
    params = params_of(model)

    def loss(p: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> Tensor:
        crops, target = sample
        return (functional_call(model, p, (crops,)).squeeze(-1) - target).pow(2).mean()

    def full_loss() -> float:
        with torch.no_grad():
            return (model(x).squeeze(-1) - y).pow(2).mean().item()

    before = full_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = poisson_batch(n, q, g)
        dp_step(loss, params, [(x[i], y[i]) for i in batch], max_grad_norm=1.0, noise_multiplier=1.0,
                expected_batch_size=int(q * n), generator=g, per_sample_decomposable=True)
        opt.step()
    assert full_loss() < 0.2 * before


def test_side_statistics_share_the_clipping_norm_with_the_gradient() -> None:
    """A unit moves the joint release (gradient + side) by at most C: the side costs no extra ε."""
    model = tiny_mlp()
    per = {n: g * 1e4 for n, g in per_sample_grads(multicrop_loss(model), params_of(model), samples(3)).items()}
    side = {"center/dino": torch.randn(3, 16) * 1e4}
    C, s = 0.5, 0.2
    base = clip_and_noise({n: g[:2] for n, g in per.items()}, C, 0.0, None, 1, side={"center/dino": side["center/dino"][:2]},
                          side_norm=s)
    full = clip_and_noise(per, C, 0.0, None, 1, side=side, side_norm=s)
    grad_moved = flat({n: full[n] - base[n] for n in per})
    side_moved = full["center/dino"] - base["center/dino"]
    assert grad_moved.norm() <= math.sqrt(C**2 - s**2) + 1e-4
    assert side_moved.norm() <= s + 1e-4
    assert torch.cat([grad_moved, side_moved]).norm() <= C + 1e-4
    # Both parts are used to their bound by a huge unit: the budget is split, not wasted.
    assert grad_moved.norm() > 0.99 * math.sqrt(C**2 - s**2) and side_moved.norm() > 0.99 * s


def test_side_statistics_get_the_gradients_noise_and_are_averaged_per_unit() -> None:
    sigma, C, B, draws = 1.1, 0.8, 4.0, 3000
    g = torch.Generator().manual_seed(1)
    zeros = {"w": torch.zeros(2, 5)}
    noise = torch.stack([clip_and_noise(zeros, C, sigma, g, B, side={"c": torch.zeros(2, 20)}, side_norm=0.3)["c"]
                         for _ in range(draws)])
    expected = sigma * C / B  # the same σC as the gradient's coordinates: one mechanism
    assert abs(noise.std().item() - expected) < 3 * expected / math.sqrt(2 * noise.numel())
    # Without noise, small side terms pass unclipped and are summed per unit, then divided by B.
    side = {"c": torch.tensor([[0.01, 0.0], [0.02, 0.0], [0.0, 0.03]])}
    out = clip_and_noise({"w": torch.zeros(3, 5)}, C, 0.0, None, 2.0, units=[0, 0, 1], side=side, side_norm=0.3)
    assert torch.allclose(out["c"], torch.tensor([0.015, 0.015]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(side={"c": torch.zeros(2, 3)}, side_norm=0.0), "side_norm"),
    (dict(side={"c": torch.zeros(2, 3)}, side_norm=1.0), "side_norm"),
    (dict(side={"w": torch.zeros(2, 3)}, side_norm=0.5), "also gradient names"),
    (dict(side={"c": torch.zeros(3, 3)}, side_norm=0.5), "number of samples"),
])
def test_bad_side_statistics_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clip_and_noise({"w": torch.zeros(2, 3)}, 1.0, 0.0, None, 1.0, **kwargs)
