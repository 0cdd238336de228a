"""Sample-level and patient-level DP-SGD for objectives whose per-sample term spans several forward inputs.

fedmri's SSL batches put 2 global + N local crops of each scan into one forward
pass, so Opacus' per-sample gradients (one per row of the batch) would be per
crop, and clipping per crop bounds nothing about one patient. Here the unit is
the sample: ``loss_fn(params, sample)`` returns the whole loss term of one
sample (all its crops), its gradient is clipped as one vector, and the
Gaussian mechanism is applied to the sum, as in Abadi et al., "Deep Learning
with Differential Privacy", CCS 2016, with Opacus' conventions
(``opacus.optimizers.DPOptimizer``): flat L2 clipping over all parameters,
noise std ``noise_multiplier * max_grad_norm``, and division by the *expected*
batch size under Poisson sampling, so the sampled batch size leaks nothing.

The guarantee holds only when the objective is a sum of per-sample terms, each
depending on one private sample: centering must be a frozen buffer during the
step, and batch-coupled terms (KoLeo, in-batch contrastive negatives) are out.

The private unit may hold several samples: a patient with k series. Clipping
each series to C would let that patient move the sum by k·C, so it would be
protected only as a group of k. At the patient level (``units`` of
:func:`clip_and_noise`) the Poisson sampling draws units (:func:`unit_batches`:
a drawn patient brings all its samples), the per-sample gradients of each
unit's samples are summed into one vector and that sum is clipped to C: one
patient moves the noised sum by at most C whatever its number of series, which
is the sensitivity the RDP accountant assumes, at the unit-level rate q.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from fedmri.accounting import ACCOUNTANT
from fedmri.errors import ConfigError

# loss_fn(params, sample) -> scalar: the whole loss term of one sample.
LossFn = Callable[[dict[str, Tensor], Any], Tensor]


def require_decomposable(per_sample_decomposable: bool, objective: str = "this objective") -> None:
    """Refuse DP-SGD for an objective whose terms couple the samples of a batch.

    Raises:
        ConfigError (a ValueError): when ``per_sample_decomposable`` is False.
    """
    if not per_sample_decomposable:
        raise ConfigError(
            f"DP-SGD refused for {objective}: it is not a sum of per-sample terms (its terms couple samples "
            "of the batch, e.g. KoLeo or in-batch contrastive negatives), so one sample changes the other "
            "samples' gradients too, and clipping per sample gives no valid (ε, δ) guarantee. Turn the coupled "
            "term off (koleo weight 0, frozen centering) or use a per-sample formulation, e.g. negatives drawn "
            "from a fixed non-patient set the site holds."
        )


def per_sample_grads(loss_fn: LossFn, params: dict[str, Tensor], samples: Sequence[Any],
                     vectorized: bool = False) -> dict[str, Tensor]:
    """Gradient of each sample's whole loss term, stacked.

    Args:
        loss_fn: ``loss_fn(params, sample) -> scalar``; it must read the weights from ``params``
            (e.g. ``torch.func.functional_call(model, params, ...)``) and use only ``sample``'s inputs.
        params: Name -> tensor requiring grad (the trained parameters).
        samples: One entry per sample: a tensor or a tuple of tensors (e.g. its crops).
        vectorized: Use ``torch.func`` (``vmap(grad(loss_fn))``) over samples stacked along a new
            leading dim; needs same-shaped samples and a vmappable loss. Default False: a loop
            of ``torch.autograd.grad``, which works for any loss.

    Returns:
        Name -> ``(len(samples), *param.shape)``; zeros where a parameter is unused.
    """
    if not samples:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    if vectorized:
        from torch.func import grad, vmap

        first = samples[0]
        if isinstance(first, Tensor):
            stacked: Any = torch.stack(list(samples))
        else:
            stacked = tuple(torch.stack([s[i] for s in samples]) for i in range(len(first)))
        detached = {name: p.detach() for name, p in params.items()}
        return vmap(grad(loss_fn), in_dims=(None, 0))(detached, stacked)
    names = list(params)
    tensors = [params[n] for n in names]
    rows: list[list[Tensor]] = [[] for _ in names]
    for sample in samples:
        grads = torch.autograd.grad(loss_fn(params, sample), tensors, allow_unused=True)
        for row, g, p in zip(rows, grads, tensors):
            row.append(torch.zeros_like(p) if g is None else g.detach())
    return {name: torch.stack(row) for name, row in zip(names, rows)}


def clip_and_noise(per_sample: dict[str, Tensor], max_grad_norm: float, noise_multiplier: float,
                   generator: torch.Generator | None, expected_batch_size: float,
                   units: Sequence[int] | None = None, side: dict[str, Tensor] | None = None,
                   side_norm: float = 0.0) -> dict[str, Tensor]:
    """Clip each unit's gradient to ``max_grad_norm``, sum, add Gaussian noise, average.

    Abadi et al. 2016 (Algorithm 1) with Opacus' ``DPOptimizer`` conventions: the clipping
    norm is taken over all parameters jointly, the factor is ``min(1, C / (‖g‖ + 1e-6))``,
    the noise is N(0, (σ·C)²) per coordinate, and the sum is divided by the expected
    batch size ``q·n`` in units (not the sampled one), as Opacus does under Poisson sampling.

    Args:
        per_sample: Name -> ``(B, *shape)`` per-sample gradients (B may be 0).
        max_grad_norm: Clipping norm C > 0.
        noise_multiplier: σ ≥ 0; 0 gives clipping alone (no privacy).
        generator: Source of the noise (on the gradients' device); None uses the global one.
        expected_batch_size: ``sample_rate * units at the site`` > 0 (patients under patient-level DP).
        units: For each of the B samples, its private unit's position in the batch (0..U-1,
            e.g. from :func:`unit_batches`); the samples of one unit are summed before the
            clipping, so one unit moves the sum by at most C. None: every sample is its own unit.
        side: Name -> ``(B, *shape)``: statistics of each sample released with its gradient
            (the teacher means of DP pretraining's centres), summed per unit like the gradients.
            The unit's side part is clipped to ``side_norm`` and its gradient to
            ``sqrt(C² - side_norm²)``: the joint vector stays within C, so the one Gaussian
            mechanism (noise σC on every coordinate) releases both at the ε of the gradient alone.
        side_norm: The side part's clipping norm, in (0, C) when ``side`` is given.

    Returns:
        Name -> ``shape``: the privatised mean gradient, and the privatised mean of each ``side``
        entry under its name.
    """
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    sizes = {g.shape[0] for g in per_sample.values()}
    if len(sizes) > 1:
        raise ValueError(f"per-sample gradients disagree on the number of samples: {sorted(sizes)}")
    parts = [per_sample]
    grad_norm = max_grad_norm
    if side:
        if not 0 < side_norm < max_grad_norm:
            raise ValueError(f"side_norm must be in (0, max_grad_norm={max_grad_norm}), got {side_norm}")
        if set(side) & set(per_sample):
            raise ValueError(f"side names {sorted(set(side) & set(per_sample))} are also gradient names")
        if {v.shape[0] for v in side.values()} != sizes:
            raise ValueError("side statistics and per-sample gradients disagree on the number of samples")
        parts.append(side)
        grad_norm = math.sqrt(max_grad_norm**2 - side_norm**2)
    if units is not None:
        parts = [sum_per_unit(part, units) for part in parts]
    std = noise_multiplier * max_grad_norm
    out: dict[str, Tensor] = {}
    for part, bound in zip(parts, (grad_norm, side_norm)):
        out.update(_clip_sum_noise(part, bound, std, generator, expected_batch_size))
    return out


def _clip_sum_noise(rows: dict[str, Tensor], bound: float, std: float, generator: torch.Generator | None,
                    expected_batch_size: float) -> dict[str, Tensor]:
    """Each row of the ``(U, *shape)`` tensors clipped jointly to ``bound``, summed, noised (std), averaged."""
    # reshape with explicit sizes: flatten(1) fails on scalar parameters' (B,) grads, reshape(B, -1) on B = 0.
    squares = [g.reshape(g.shape[0], math.prod(g.shape[1:])).pow(2).sum(1) for g in rows.values()]
    norms = torch.stack(squares).sum(0).sqrt()  # U
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)  # U
    out: dict[str, Tensor] = {}
    for name, g in rows.items():
        summed = torch.einsum("b,b...->...", factor.to(g.dtype), g)
        if std > 0:
            summed = summed + torch.normal(0.0, std, summed.shape, generator=generator,
                                           device=summed.device, dtype=summed.dtype)
        out[name] = summed / expected_batch_size
    return out


def sum_per_unit(per_sample: dict[str, Tensor], units: Sequence[int]) -> dict[str, Tensor]:
    """Name -> ``(U, *shape)``: the per-sample gradients summed over each unit's samples.

    Args:
        per_sample: Name -> ``(B, *shape)``.
        units: For each sample, its unit's position, an integer >= 0; U is the largest + 1. A
            position no sample has gives a zero row, which adds nothing after clipping (a drawn
            patient whose samples were all left out, e.g. without labels).

    Raises:
        ValueError: ``units`` of another length than B, or a negative position.
    """
    owners = [int(u) for u in units]
    if any(u < 0 for u in owners):
        raise ValueError(f"units must be positions >= 0 in the batch, got {min(owners)}")
    count = max(owners, default=-1) + 1
    out = {}
    for name, g in per_sample.items():
        if g.shape[0] != len(owners):
            raise ValueError(f"{len(owners)} units given for {g.shape[0]} per-sample gradients of {name}")
        index = torch.tensor(owners, dtype=torch.long, device=g.device)
        out[name] = g.new_zeros((count, *g.shape[1:])).index_add_(0, index, g)
    return out


def unit_members(keys: Sequence[Hashable]) -> list[list[int]]:
    """The samples of each private unit: indices grouped by ``keys``, units in first-seen order.

    ``keys`` holds each sample's unit key, e.g. its pseudonymous patient id (patient-level DP),
    or ``range(n)`` for one unit per sample.
    """
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    return list(members.values())


def unit_batches(members: Sequence[Sequence[int]], sample_rate: float, steps: int,
                 seed: int) -> list[tuple[list[int], list[int]]]:
    """``steps`` Poisson batches of units, each as ``(samples, units)`` for :func:`clip_and_noise`.

    Each unit joins a step independently with probability ``sample_rate`` (the rate the
    accountant composes) and brings all of its samples: ``samples`` lists them, unit after
    unit, and ``units`` gives each one its unit's position in the step. With one sample per
    unit the draws are those of :func:`poisson_batches` for the same seed.

    Args:
        members: The sample indices of each unit (:func:`unit_members`).
        sample_rate, steps, seed: As in :func:`poisson_batches`.
    """
    out = []
    for batch in poisson_batches(len(members), sample_rate, steps, seed):
        samples = [i for u in batch for i in members[u]]
        units = [k for k, u in enumerate(batch) for _ in members[u]]
        out.append((samples, units))
    return out


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator | None = None) -> list[int]:
    """Indices of a Poisson-sampled batch: each of ``range(n)`` in independently with prob ``sample_rate``.

    The batch may be empty; the RDP accounting of the Sampled Gaussian Mechanism assumes this sampling.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    mask = torch.rand(n, generator=generator) < sample_rate
    return mask.nonzero().flatten().tolist()


def poisson_batches(n: int, sample_rate: float, steps: int, seed: int) -> list[list[int]]:
    """``steps`` Poisson batches of ``range(n)`` from the secret ``seed`` (batches may be empty)."""
    generator = torch.Generator().manual_seed(seed % 2**63)
    return [poisson_batch(n, sample_rate, generator) for _ in range(steps)]


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The Gaussian noise's generator on ``device``, from the secret seed."""
    return torch.Generator(device=device).manual_seed(seed % 2**63 ^ 0x5EED)


def dp_step(loss_fn: LossFn, params: dict[str, Tensor], samples: Sequence[Any], *, max_grad_norm: float,
            noise_multiplier: float, expected_batch_size: float, generator: torch.Generator | None,
            per_sample_decomposable: bool, vectorized: bool = False,
            extra_grad: Callable[[], dict[str, Tensor]] | None = None,
            units: Sequence[int] | None = None, side: Callable[[], dict[str, Tensor]] | None = None,
            side_norm: float = 0.0) -> dict[str, Tensor]:
    """One DP-SGD gradient: per-sample grads, clipping per unit, noise; written to each param's ``.grad``.

    Any torch optimizer can then ``step()``. An empty batch still gets noise, as the
    accounting assumes.

    Args:
        loss_fn, params, samples, vectorized: As in :func:`per_sample_grads`.
        max_grad_norm, noise_multiplier, expected_batch_size, generator: As in :func:`clip_and_noise`.
        per_sample_decomposable: Whether the objective is a sum of terms each depending on one
            sample only; False raises (see :func:`require_decomposable`).
        extra_grad: A gradient of a data-independent term (FedProx's), by parameter name,
            added after the noise: post-processing, it costs no privacy.
        units: Each sample's unit in the batch (patient-level DP), as in :func:`clip_and_noise`.
        side, side_norm: Called once the per-sample losses have run, ``side()`` gives the
            per-sample statistics released with the gradients (:func:`clip_and_noise`'s ``side``).

    Returns:
        Name -> the privatised gradient (without ``extra_grad``), and the released side statistics.
    """
    require_decomposable(per_sample_decomposable)
    per_sample = per_sample_grads(loss_fn, params, samples, vectorized)
    grads = clip_and_noise(per_sample, max_grad_norm, noise_multiplier, generator, expected_batch_size, units,
                           side() if side is not None else None, side_norm)
    extra = extra_grad() if extra_grad is not None else {}
    for name, p in params.items():
        p.grad = (grads[name] + extra[name] if name in extra else grads[name]).to(p.dtype)
    return grads


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier σ whose RDP ε at ``delta`` after ``steps`` steps is ≤ the target (within 0.01).

    Uses ``opacus.accountants.utils.get_noise_multiplier`` with the RDP accountant, the one
    the site's ledger composes.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search tries large σ, whose ε is tiny and optimal at the largest RDP order; Opacus warns
        # there, but those trial σ are discarded and the returned one is checked against the target.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT))
