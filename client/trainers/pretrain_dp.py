"""Self-supervised pretraining under patient- or sample-level DP-SGD (one round at a site).

A series' loss term is the DINO + iBOT loss of all its crops (2 global, N
local) against the teacher, computed alone. Under ``policy.dp.unit: patient``
(the default) the gradients of one patient's series are summed and that sum
is clipped as one vector; under ``series`` each series' gradient is
(:mod:`fedmri.client.privacy.dp_sgd`). A term depends on its series only when

- the centres stay fixed during a step (``update_centers=False``): a centre
  moved by the step's own batch would make each target depend on other series;
- KoLeo is off: its nearest-neighbour term couples the batch (switched off here,
  with a log line, whatever the run config says), or computed on a batch of the
  site's public series instead (``ssl.dp_public_koleo``, :class:`PublicKoLeo`):
  a gradient that reads no patient's series, added after the noise;
- centering is ``centering``: Sinkhorn-Knopp balances targets across the batch
  (refused with the reason).

The centres still move, between steps (``ssl.dp_center``, on by default);
frozen, they would stay at their initial zero for the whole run. Each
series' teacher means (the terms the centre's EMA would fold in, averaged over
its patient's series in the step) ride along with its gradient: the patient's
gradient is clipped to C·sqrt(1 - share), its scaled teacher means to C·sqrt(share),
and the one Gaussian mechanism noises both (:func:`~fedmri.client.privacy.dp_sgd.clip_and_noise`'s
``side``). The joint vector stays within C, so the centres cost no ε beyond
the gradients'; the noisy mean then enters the centres' EMA. Teacher means are
cosines (the head's logits), so ``radius`` bounds them in logit units, and the
noise on a centre coordinate is σ·radius / (sqrt(share)·q·n) before the EMA
averages it. It does not stop the collapse on the demo: with KoLeo off, the
teacher collapses onto one prototype with or without DP, and at ~4 patients a
step the released centre is mostly noise (benchmarks/RESULTS.md, "DP centre").
KoLeo on public series does (same file, "KoLeo on public series").

Everything else is post-processing of the noisy releases: AdamW, the FedProx
term (a function of the weights only), the centres' EMA and the local teacher
EMA; the centres sent back are such post-processing too. Batches are
Poisson samples of the units (a drawn patient brings all its series) with
rate ``q = batch_size / series``, drawn, like the noise, from the site's
secret seed (:class:`fedmri.client.privacy.gate.DPPlan`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
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


def make_private(meta: Any, public_koleo: bool = False) -> None:
    """Switch off the batch-coupled terms of an :class:`~fedmri.ssl.SSLMetaArch` for DP-SGD.

    Args:
        meta: The SSL meta-architecture.
        public_koleo: KoLeo moves to public series (:class:`PublicKoLeo`) instead of going.

    Raises:
        DeclineError: A term that cannot be made per-sample (Sinkhorn-Knopp centering).
    """
    if meta.koleo_loss is not None:
        if not public_koleo:
            log.info("DP-SGD: the KoLeo term couples the samples of a batch; it is off for this round")
        meta.koleo_loss = None
    if not meta.per_sample_decomposable:
        raise DeclineError("pretraining under DP-SGD needs ssl.centering=centering: Sinkhorn-Knopp balances the "
                           "teacher targets across the batch, so one series would change the others' terms")


def ssl_sample_loss(meta: Any, teacher_temp: float, seen: list[dict[str, float]] | None = None,
                    terms: list[dict[str, Tensor]] | None = None
                    ) -> Callable[[dict[str, Tensor], SampleCrops], Tensor]:
    """``loss(params, crops)``: the whole DINO + iBOT loss of one series' crops, centres fixed.

    Each call appends its named loss values to ``seen`` and its teacher means (the
    centres' terms, see :meth:`fedmri.ssl.SSLMetaArch.forward`) to ``terms`` when given.
    """
    from fedmri.client.trainers.pretrain import named_ssl_losses

    def loss(params: dict[str, Tensor], crops: SampleCrops) -> Tensor:
        found: dict[str, Tensor] | None = {} if terms is not None else None
        losses = meta(crops, crops["masks"], teacher_temp, update_centers=False, center_terms=found)
        if seen is not None:
            seen.append(named_ssl_losses(losses))
        if terms is not None and found is not None:
            terms.append(found)
        return sum(losses.values())

    return loss


class DPCenter:
    """The centres' terms as the side part of DP-SGD's norm budget, and the update from their release.

    Args:
        meta: The SSL meta-architecture (its DINO and iBOT losses hold the centres).
        cfg: ``ssl.dp_center`` of the run config.
        center_momentum: ``ssl.center_momentum``, used when ``cfg.momentum`` is null.
        max_grad_norm: The round's DP clipping norm C.
    """

    def __init__(self, meta: Any, cfg: Any, center_momentum: float, max_grad_norm: float) -> None:
        self.losses = {name: loss for name, loss in (("dino", meta.dino_loss), ("ibot", meta.ibot_loss))
                       if loss is not None}
        self.side_norm = max_grad_norm * math.sqrt(float(cfg.share))
        self.scale = self.side_norm / float(cfg.radius)  # teacher means -> side units
        self.momentum = float(center_momentum if cfg.momentum is None else cfg.momentum)
        self.terms: list[dict[str, Tensor]] = []  # one per series of the step, in order

    @staticmethod
    def side_name(name: str) -> str:
        return f"center/{name}"

    def side(self, units: Sequence[int] | None) -> Callable[[], dict[str, Tensor]]:
        """``side()``: each series' scaled teacher means, divided by its patient's series in the step.

        Summed per patient, that is the patient's mean: one patient weighs as one in the centre
        whatever its number of series. A series with no masked patch adds nothing to ``ibot``.
        """
        def side() -> dict[str, Tensor]:
            owners = list(units) if units is not None else list(range(len(self.terms)))
            counts = Counter(owners)
            out = {}
            for name, loss in self.losses.items():
                zero = loss.center.new_zeros(loss.center.shape[-1])
                rows = [t.get(name, zero) * (self.scale / counts[u]) for t, u in zip(self.terms, owners)]
                out[self.side_name(name)] = torch.stack(rows) if rows else zero.new_zeros((0, zero.shape[0]))
            return out

        return side

    def update(self, released: dict[str, Tensor]) -> None:
        """Fold the released mean teacher terms into the centres (post-processing); clear the step's terms."""
        for name, loss in self.losses.items():
            loss.update_center(released[self.side_name(name)][None] / self.scale, self.momentum)
        self.terms.clear()


class PublicKoLeo:
    """KoLeo on public series: a gradient that reads no patient's series, added after the noise.

    Each step draws ``batch_size`` series of the site's public catalog, takes their two
    global crops through the student backbone and adds ``weight`` x the KoLeo loss of
    each crop's CLS tokens, as :class:`~fedmri.ssl.SSLMetaArch` does on the
    training batch without DP. Its gradient depends on the student's weights (themselves
    noisy releases) and public data only, so adding it is post-processing: no ε.

    Args:
        meta: The SSL meta-architecture (its student backbone).
        dataset: The public series.
        batches: One index list per step (drawn from the round's seed).
        transform: The multi-crop transform of the run.
        seed: Seeds the crops.
        weight: :func:`public_koleo_weight`.
        device: Where the model is.
    """

    def __init__(self, meta: Any, dataset: Any, batches: Sequence[Sequence[int]], transform: Any, seed: int,
                 weight: float, device: torch.device) -> None:
        from fedmri.client.trainers.batches import load_batches
        from fedmri.losses import KoLeoLoss

        self.meta, self.weight, self.device = meta, float(weight), device
        self.params = {n: p for n, p in meta.student.named_parameters() if p.requires_grad}
        self.loss = KoLeoLoss()
        self.draws = load_batches(dataset, batches, transform, seed)
        self.values: list[float] = []

    def gradients(self) -> dict[str, Tensor]:
        """The next public batch's weighted KoLeo gradient, by student parameter name."""
        from fedmri.client.trainers.pretrain import to_device
        from fedmri.ssl import collate_multicrop
        from fedmri.ssl.meta_arch import N_GLOBAL_CROPS

        crops = to_device(collate_multicrop([d["crops"] for d in next(self.draws)]), self.device)
        cls = self.meta.student["backbone"](crops["global_crops"])["cls"]
        value = self.weight * sum(self.loss(c) for c in cls.chunk(N_GLOBAL_CROPS))
        grads = torch.autograd.grad(value, list(self.params.values()), allow_unused=True)
        self.values.append(float(value.detach()))
        return {n: g for n, g in zip(self.params, grads) if g is not None}


def public_koleo_weight(ssl_cfg: Any) -> float:
    """The public KoLeo term's weight: ``ssl.dp_public_koleo.weight``, or ``ssl.koleo_loss_weight`` when null."""
    weight = ssl_cfg.dp_public_koleo.weight
    return float(ssl_cfg.koleo_loss_weight if weight is None else weight)


def _summed(*parts: Callable[[], dict[str, Tensor]] | None) -> Callable[[], dict[str, Tensor]]:
    """One ``extra_grad``: the named gradients of ``parts`` added up."""
    def total() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in parts:
            for name, g in (part() if part is not None else {}).items():
                out[name] = out[name] + g if name in out else g
        return out

    return total


def dp_ssl_step(meta: Any, samples: Sequence[SampleCrops], teacher_temp: float, *, max_grad_norm: float,
                noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                extra_grad: Callable[[], dict[str, Tensor]] | None = None,
                seen: list[dict[str, float]] | None = None, units: Sequence[int] | None = None,
                center: DPCenter | None = None) -> dict[str, Tensor]:
    """Write one DP-SGD gradient of the student into ``.grad``; returns it.

    Args:
        meta: The SSL meta-architecture, made private by :func:`make_private`.
        samples: Each series' crops and masks (a batch of one each, on the model's device).
        teacher_temp: The round's teacher temperature.
        max_grad_norm, noise_multiplier, expected_batch_size, generator: The DP-SGD mechanism.
        extra_grad: A data-independent gradient added after the noise (FedProx).
        seen: Receives each sample's named loss values.
        units: Each series' patient position in the step (patient-level DP); None: each series alone.
        center: The DP centre: its terms are released with the gradient and folded into the
            centres after the step. None: the centres stay as they are.
    """
    params = {n: p for n, p in meta.student.named_parameters() if p.requires_grad}
    loss = ssl_sample_loss(meta, teacher_temp, seen, center.terms if center is not None else None)
    out = dp_step(loss, params, list(samples), max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                  expected_batch_size=expected_batch_size, generator=generator,
                  per_sample_decomposable=meta.per_sample_decomposable, extra_grad=extra_grad, units=units,
                  side=center.side(units) if center is not None else None,
                  side_norm=center.side_norm if center is not None else 0.0)
    if center is not None:
        center.update(out)
    return out


def dp_pretrain_loop(meta: Any, dataset: Any, run_cfg: Any, request: Any, plan: Any, device: torch.device,
                     optimizer: torch.optim.Optimizer, proximal: Any, num_workers: int = 0,
                     public: Any = None) -> dict[str, float]:
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
        public: Public series for KoLeo (:class:`PublicKoLeo`, ``ssl.dp_public_koleo``); None: no KoLeo.
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
    center = DPCenter(meta, s.dp_center, s.center_momentum, plan.max_grad_norm) if s.dp_center.enabled else None
    loader = load_batches(dataset, [series for series, _ in batches], transform, derive_seed(plan.seed, "crops"),
                          num_workers)
    koleo = None
    if public is not None:
        public_rng = np.random.default_rng(derive_seed(plan.seed, "public"))
        size = min(int(s.dp_public_koleo.batch_size), len(public))
        koleo = PublicKoLeo(meta, public, [sorted(public_rng.choice(len(public), size, replace=False).tolist())
                                           for _ in batches], transform, derive_seed(plan.seed, "public-crops"),
                            public_koleo_weight(s), device)
    extra_grad = _summed(proximal.named_gradients, koleo.gradients if koleo is not None else None)
    for (_, units), draws in zip(batches, loader):
        samples = [to_device(collate_multicrop([d["crops"]], masker, s.mask_sample_probability,
                                               s.mask_ratio_min_max, mask_rng), device) for d in draws]
        optimizer.zero_grad(set_to_none=True)
        dp_ssl_step(meta, samples, request.teacher_temp, max_grad_norm=plan.max_grad_norm,
                    noise_multiplier=plan.noise_multiplier, expected_batch_size=plan.expected_batch_size,
                    generator=generator, extra_grad=extra_grad, seen=seen, units=units, center=center)
        optimizer.step()
        meta.update_teacher(request.teacher_momentum)
    metrics = mean_losses(seen)
    if koleo is not None and koleo.values:
        metrics["public_koleo_loss"] = sum(koleo.values) / len(koleo.values)
    return metrics
