"""Self-supervised pretraining under patient- or sample-level DP-SGD (one round at a site).

A series' loss term is the DINO + iBOT loss of all its crops (2 global, N
local) against the teacher, computed alone. Under ``policy.dp.unit: patient``
(the default) the gradients of one patient's series are summed and that sum
is clipped as one vector; under ``series`` each series' gradient is
(:mod:`fedmri.client.privacy.dp_sgd`). A term depends on its series only when

- the centres stay fixed for the round (``update_centers=False``): a centre
  moved by this round's batches would make each target depend on other series;
  the centres sent back are the ones received, so no statistic of the data
  leaves outside the noisy gradients;
- KoLeo is off: its nearest-neighbour term couples the batch (switched off here,
  with a log line, whatever the run config says);
- centering is ``centering``: Sinkhorn-Knopp balances targets across the batch
  (refused with the reason).

Everything else is post-processing of the noisy gradients: AdamW, the FedProx
term (a function of the weights only) and the local teacher EMA. Batches are
Poisson samples of the units (a drawn patient brings all its series) with
rate ``q = batch_size / series``, drawn, like the noise, from the site's
secret seed (:class:`fedmri.client.privacy.gate.DPPlan`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmri.client.privacy.dp_sgd import dp_step, noise_generator, unit_batches
from fedmri.client.trainers.optim import mean_losses
from fedmri.client.trainers.context import DeclineError

log = logging.getLogger(__name__)

# One series' crops and masks, as collate_multicrop gives them for a batch of one.
SampleCrops = dict[str, Tensor | None]


def make_private(meta: Any) -> None:
    """Switch off the batch-coupled terms of an :class:`~fedmri.ssl.SSLMetaArch` for DP-SGD.

    Raises:
        DeclineError: A term that cannot be made per-sample (Sinkhorn-Knopp centering).
    """
    if meta.koleo_loss is not None:
        log.info("DP-SGD: the KoLeo term couples the samples of a batch; it is off for this round")
        meta.koleo_loss = None
    if not meta.per_sample_decomposable:
        raise DeclineError("pretraining under DP-SGD needs ssl.centering=centering: Sinkhorn-Knopp balances the "
                           "teacher targets across the batch, so one series would change the others' terms")


def ssl_sample_loss(meta: Any, teacher_temp: float, seen: list[dict[str, float]] | None = None
                    ) -> Callable[[dict[str, Tensor], SampleCrops], Tensor]:
    """``loss(params, crops)``: the whole DINO + iBOT loss of one series' crops, centres fixed.

    Each call appends its named loss values to ``seen`` when given (for the round's metrics).
    """
    from fedmri.client.trainers.pretrain import named_ssl_losses

    def loss(params: dict[str, Tensor], crops: SampleCrops) -> Tensor:
        losses = meta(crops, crops["masks"], teacher_temp, update_centers=False)
        if seen is not None:
            seen.append(named_ssl_losses(losses))
        return sum(losses.values())

    return loss


def dp_ssl_step(meta: Any, samples: Sequence[SampleCrops], teacher_temp: float, *, max_grad_norm: float,
                noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                extra_grad: Callable[[], dict[str, Tensor]] | None = None,
                seen: list[dict[str, float]] | None = None, units: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Write one DP-SGD gradient of the student into ``.grad``; returns it.

    Args:
        meta: The SSL meta-architecture, made private by :func:`make_private`.
        samples: Each series' crops and masks (a batch of one each, on the model's device).
        teacher_temp: The round's teacher temperature.
        max_grad_norm, noise_multiplier, expected_batch_size, generator: The DP-SGD mechanism.
        extra_grad: A data-independent gradient added after the noise (FedProx).
        seen: Receives each sample's named loss values.
        units: Each series' patient position in the step (patient-level DP); None: each series alone.
    """
    params = {n: p for n, p in meta.student.named_parameters() if p.requires_grad}
    return dp_step(ssl_sample_loss(meta, teacher_temp, seen), params, list(samples), max_grad_norm=max_grad_norm,
                   noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, generator=generator,
                   per_sample_decomposable=meta.per_sample_decomposable, extra_grad=extra_grad, units=units)


def dp_pretrain_loop(meta: Any, dataset: Any, run_cfg: Any, request: Any, plan: Any, device: torch.device,
                     optimizer: torch.optim.Optimizer, proximal: Any, num_workers: int = 0) -> dict[str, float]:
    """``plan.steps`` DP-SGD steps on Poisson batches of ``plan``'s units; the mean of each loss over series.

    Args:
        meta: The SSL meta-architecture on ``device``, made private by :func:`make_private`.
        dataset: The site's training series (``plan.members`` indexes them).
        run_cfg: The run config (ssl section: masking).
        request: The round's request (teacher temperature and momentum).
        plan: The round's :class:`~fedmri.client.privacy.gate.DPPlan`.
        optimizer: Over the student's parameters, rates set.
        proximal: The FedProx term (its gradient is added after the noise).
        num_workers: Data-loading workers.
    """
    from fedmri.client.trainers.batches import load_batches
    from fedmri.client.trainers.context import derive_seed
    from fedmri.client.trainers.pretrain import MultiCropTransform, to_device
    from fedmri.ssl import build_mask_generator, collate_multicrop

    s = run_cfg.ssl
    masker = build_mask_generator(run_cfg) if meta.ibot_loss is not None else None
    mask_rng = np.random.default_rng(derive_seed(plan.seed, "masks"))
    if plan.samples != len(dataset):
        raise ValueError(f"the plan counts {plan.samples} series, the site has {len(dataset)}")
    batches = unit_batches(plan.members, plan.sample_rate, plan.steps, plan.seed)
    generator = noise_generator(plan.seed, device)
    seen: list[dict[str, float]] = []
    transform = MultiCropTransform(run_cfg)
    loader = load_batches(dataset, [series for series, _ in batches], transform, derive_seed(plan.seed, "crops"),
                          num_workers)
    for (_, units), draws in zip(batches, loader):
        samples = [to_device(collate_multicrop([d["crops"]], masker, s.mask_sample_probability,
                                               s.mask_ratio_min_max, mask_rng), device) for d in draws]
        optimizer.zero_grad(set_to_none=True)
        dp_ssl_step(meta, samples, request.teacher_temp, max_grad_norm=plan.max_grad_norm,
                    noise_multiplier=plan.noise_multiplier, expected_batch_size=plan.expected_batch_size,
                    generator=generator, extra_grad=proximal.named_gradients, seen=seen, units=units)
        optimizer.step()
        meta.update_teacher(request.teacher_momentum)
    return mean_losses(seen)
