"""Pieces every local trainer shares: the round's optimiser and FedProx term, running means, the finish."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedmri.protocol import DeclineError


class Proximal:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` (Li et al., MLSys 2020).

    It pulls the local model towards the round's global weights, bounding how
    far a site with few, skewed series drifts in many local steps.

    Args:
        params: The trainable parameters, as named in the model.
        mu: The proximal weight; 0 switches the term off (no copy is kept).
    """

    def __init__(self, params: Iterable[tuple[str, nn.Parameter]], mu: float) -> None:
        if mu < 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu}")
        self.mu = float(mu)
        named = [(n, p) for n, p in params if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.reference = [p.detach().clone() for p in self.params] if self.mu > 0 else []

    def __call__(self) -> Tensor | None:
        """The term for the current weights, or None when ``mu`` is 0."""
        if self.mu == 0:
            return None
        sq = sum(((p - r) ** 2).sum() for p, r in zip(self.params, self.reference))
        return 0.5 * self.mu * sq

    @torch.no_grad()
    def named_gradients(self) -> dict[str, Tensor]:
        """The term's gradient ``mu * (w - w_global)`` by parameter name; {} when ``mu`` is 0."""
        if self.mu == 0:
            return {}
        return {n: self.mu * (p - r) for n, p, r in zip(self.names, self.params, self.reference)}


def local_step(optimizer: torch.optim.Optimizer, total: Tensor, named: dict[str, float], proximal: Proximal,
               clip: tuple[list[nn.Parameter], float] | None = None) -> dict[str, float]:
    """One optimisation step of a non-private trainer on ``total``, with FedProx's term added.

    Args:
        optimizer: Over the trained parameters.
        total: The step's loss.
        named: The step's named loss values; ``proximal_loss`` is added when FedProx is on.
        proximal: The round's FedProx term.
        clip: ``(parameters, max_norm)`` to clip the gradient's norm before the step; None = no clipping.

    Returns:
        ``named``, for the round's running means.
    """
    prox = proximal()
    if prox is not None:
        total = total + prox
        named["proximal_loss"] = float(prox.detach())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(*clip)
    optimizer.step()
    return named


def set_rates(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Round values times each group's ``lr_multiplier`` / ``wd_multiplier`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_multiplier", 1.0)


def decay_groups(params: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Trainable parameters in two groups: weight decay on matrices only (no biases, norms, scales)."""
    groups: dict[float, list[nn.Parameter]] = {0.0: [], 1.0: []}
    for name, p in params:
        if p.requires_grad:
            no_wd = p.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower()
            groups[0.0 if no_wd else 1.0].append(p)
    return [{"params": ps, "wd_multiplier": wd} for wd, ps in groups.items() if ps]


class RunningMean:
    """Weighted means of named scalars over steps or batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: Mapping[str, Tensor | float], weight: float = 1.0) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": self.sums[k] / self.weights[k] for k in self.sums}


def mean_losses(seen: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each named loss over the samples seen; {} when none were (empty Poisson batches)."""
    return {k: float(np.mean([r[k] for r in seen])) for k in seen[0]} if seen else {}


def finite_state(state: Mapping[str, Tensor]) -> bool:
    """Every floating tensor of ``state`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def adamw(param_groups: list[dict[str, Any]]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel when every parameter is on a CUDA device.

    The fused step is one kernel launch for all tensors instead of several per
    tensor list. Elsewhere torch's default (foreach) runs, as CPU sites always have.
    """
    params = [p for group in param_groups for p in group["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(param_groups, fused=True if on_cuda else None)


def round_optimizer(param_groups: list[dict[str, Any]], named_parameters: Iterable[tuple[str, nn.Parameter]],
                    request: Any) -> tuple[torch.optim.AdamW, Proximal]:
    """AdamW (:func:`adamw`) over ``param_groups`` at the round's ``lr`` and ``weight_decay``, and
    FedProx's term (``request.proximal_mu``) around the parameters as they came down."""
    optimizer = adamw(param_groups)
    set_rates(optimizer, request.lr, request.weight_decay)
    return optimizer, Proximal(named_parameters, request.proximal_mu)


def finish_round(up: Mapping[str, Tensor], metrics: dict[str, float], examples: int, steps: int,
                 what: str) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The round's update as float32 CPU copies and its metrics (``num-examples``, ``steps``, the rest).

    Raises:
        DeclineError: A non-finite weight or metric: ``what`` diverged at the site.
    """
    up = {k: v.detach().to("cpu", torch.float32).clone() for k, v in up.items()}
    if not finite_state(up) or not all(math.isfinite(v) for v in metrics.values()):
        raise DeclineError(f"{what} diverged at the site (non-finite loss or weights); lower the learning rate")
    return up, {"num-examples": examples, "steps": steps, **metrics}
