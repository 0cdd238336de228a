"""Local site-level DP: the site clips its whole update and adds Gaussian noise before it leaves.

The site's delta ``up - down`` over its floating tensors is clipped to L2 norm
``C`` (all tensors together, FlatClip as in McMahan et al. 2018 and Flower's
``LocalDpMod``, ``flwr/clientapp/mod/localdp_mod.py``), and ``N(0, (z C)^2)`` is
added to every coordinate. Unlike ``LocalDpMod``, whose noise std comes from a
target (ε, δ) of the classic one-shot Gaussian bound, the noise is set by a noise
multiplier ``z`` so that the rounds compose under RDP, and it is drawn from a
generator the caller passes in, not NumPy's global one. The site's ledger accounts
each release as the Gaussian mechanism at ``z / 2`` (replace-one adjacency: two
clipped updates lie up to ``2C`` apart; ``PrivacyGate.plan_site_level``), composed
with the site's DP-SGD rounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def privatize_update(down: dict[str, Tensor], up: dict[str, Tensor], clip_norm: float, noise_multiplier: float,
                     generator: torch.Generator) -> tuple[dict[str, Tensor], float]:
    """``down`` + the clipped delta + Gaussian noise, for every key of ``up``; and the delta's norm.

    Only floating tensors are clipped (jointly: one norm over all of them) and noised;
    integer and bool tensors come back as in ``up`` and are outside the DP guarantee.
    Norm, scaling and noise are computed in float64; each result has its ``up`` tensor's
    dtype and device. The inputs are not modified.

    Args:
        down: The parameters the coordinator sent (name -> tensor).
        up: The site's trained parameters; its keys must be among ``down``'s, with the same shapes.
        clip_norm: ``C`` > 0, the most L2 norm of the update.
        noise_multiplier: ``z`` >= 0; the noise std is ``z * C``. 0 clips but gives no privacy.
        generator: Source of the noise; the noise is drawn on its device. Seed it from OS
            entropy (``torch.Generator().seed()``), never from the run's seed: whoever knows
            the seed can redraw the noise and subtract it.

    Returns:
        Name -> privatised tensor for every key of ``up``, and ``||up - down||_2`` before clipping.

    Raises:
        ValueError: ``clip_norm`` or ``noise_multiplier`` is out of range, a key of ``up`` is not
            in ``down``, a shape differs, or the delta is not finite.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    for key, value in up.items():
        if key not in down:
            raise ValueError(f"the update carries {key!r}, which the coordinator did not send")
        if value.shape != down[key].shape:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, the coordinator sent {tuple(down[key].shape)}")
    floating = [key for key, value in up.items() if value.is_floating_point()]

    def delta(key: str) -> Tensor:
        return up[key].double() - down[key].to(up[key].device).double()

    with torch.no_grad():
        norm = math.sqrt(sum(float(delta(key).pow(2).sum()) for key in floating))
        if not math.isfinite(norm):
            raise ValueError(f"the update's delta norm is {norm}: the local training diverged")
        factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        std = noise_multiplier * clip_norm
        out = dict(up)
        for key in floating:
            value = up[key].double() if factor == 1.0 else down[key].to(up[key].device).double() + factor * delta(key)
            if std > 0:
                noise = torch.randn(value.shape, generator=generator, device=generator.device, dtype=torch.float64)
                value = value + std * noise.to(value.device)
            out[key] = value.to(up[key].dtype)
    return out, norm
