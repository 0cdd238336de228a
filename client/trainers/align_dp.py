"""Image-report alignment under patient- or sample-level DP-SGD (one round at a site).

A sample is one image-report pair: a distinct report with the series filed
under it (:func:`fedmri.client.trainers.align.report_pairs`). Its loss term
contrasts one of its series with its report against the run's fixed, public
negatives (:func:`fedmri.align.dp_negatives.fixed_negative_loss`), so it
depends on that pair alone. Under ``policy.dp.unit: patient`` (the default)
a pair is one patient's series of one report (:func:`private_pairs`: a report
text two patients share gives each their own pair), the gradients of one
patient's pairs are summed and the sum is clipped as one vector; under
``series`` each pair's gradient is (:mod:`fedmri.client.privacy.dp_sgd`).
The module docstring of :mod:`fedmri.align.dp_negatives` states the
guarantee and its limits.

- In-batch negatives (``align.dp_negatives: none``) are declined with the reason.
- The site's queue of past text embeddings is off: it holds other pairs' reports.
- AdamW and the FedProx term (a function of the weights only) post-process the
  noisy gradient.
- Batches are Poisson samples of the units (a drawn patient brings all its
  pairs) with rate ``q = batch_size / pairs``; they, the series each pair
  shows and the noise are drawn from the site's secret seed (:class:`fedmri.client.privacy.gate.DPPlan`), never from the
  round seed the coordinator knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmri.align import AlignedModel
from fedmri.align.dp_negatives import fixed_negative_loss, fixed_negative_texts, require_dp_valid
from fedmri.client.privacy.dp_sgd import dp_step, noise_generator, unit_batches
from fedmri.client.trainers.align import encode_reports, series_image
from fedmri.client.trainers.batches import load_batches
from fedmri.client.trainers.context import DeclineError, derive_seed
from fedmri.client.trainers.optim import mean_losses
from fedmri.errors import ConfigError

log = logging.getLogger(__name__)

# One pair as a step sees it: one of its series (1, X, Y, Z) on the device, and its report's index.
Pair = tuple[Tensor, int]
# The frozen tower's pooled output of the fixed negatives, by tower and count: encoding
# them takes seconds on a CPU, and neither the cached tower nor the texts change.
_POOLED_NEGATIVES: dict[tuple[str, str, int, int], Tensor] = {}


@dataclass(frozen=True)
class PrivatePairs:
    """The pairs a DP round samples from, each with its report, its series and its patient."""

    # Index of each pair's report in the site's distinct reports.
    report: list[int]
    # Each pair's series (indices in the dataset); a step shows one of them.
    series: list[list[int]]
    # Each pair's patient key (site-local pseudonym), for PrivacyGate.plan.
    patient: list[str]

    def __len__(self) -> int:
        return len(self.report)


def private_pairs(series_of: Sequence[Sequence[int]], patients: Sequence[str], unit: str) -> PrivatePairs:
    """The round's pairs: one per distinct report (``unit`` series), or per report and patient (``patient``).

    Two patients with the same report text share one pair under ``series`` (today's unit, the
    pair); under ``patient`` each keeps their own, so that every pair, and so every clipped
    patient sum, reads one patient's images only.

    Args:
        series_of: For each distinct report, the indices of its series in the dataset.
        patients: Each series' patient key (:func:`fedmri.client.trainers.data.patient_keys`).
        unit: ``"patient"`` or ``"series"`` (``policy.dp.unit``).
    """
    report: list[int] = []
    series: list[list[int]] = []
    patient: list[str] = []
    for r, members in enumerate(series_of):
        if unit == "series":
            groups = {patients[members[0]]: list(members)} if members else {}
        else:
            groups = {}
            for i in members:
                groups.setdefault(patients[i], []).append(int(i))
        for key, group in groups.items():
            report.append(r)
            series.append(group)
            patient.append(key)
    return PrivatePairs(report, series, patient)


def require_dp_align(run_cfg: Any, where: str) -> None:
    """Decline a DP round whose alignment contrasts the pairs of a batch (the reason says why and what to set).

    Raises:
        DeclineError: ``align.dp_negatives`` is ``"none"`` or invalid.
    """
    try:
        require_dp_valid(run_cfg, where)
    except ConfigError as exc:
        raise DeclineError(str(exc)) from None


def negative_texts(cfg: Any) -> list[str]:
    """The fixed negatives of ``align.dp_negatives: synthetic``, prepared as the tower reads reports.

    ``align.dp_num_negatives`` distinct texts in a fixed order
    (:func:`fedmri.align.dp_negatives.fixed_negative_texts`): no patient data, and
    the same list at every site, in every process and on every release.

    Args:
        cfg: The run config or its align section.

    Raises:
        ConfigError: ``align.dp_negatives`` is ``"none"`` (there are no fixed negatives) or invalid.
    """
    require_dp_valid(cfg, "fixed negatives")
    align = cfg.align if hasattr(cfg, "align") else cfg
    return fixed_negative_texts(int(align.dp_num_negatives))


def pooled_negatives(model: AlignedModel, run_cfg: Any, negatives: list[str], device: torch.device) -> Tensor:
    """The frozen tower's pooled output of the fixed negatives (K, H), encoded once per process."""
    a = run_cfg.align
    key = (str(a.text_model), str(a.text_pooling), int(a.max_tokens), len(negatives))
    if key not in _POOLED_NEGATIVES:
        _POOLED_NEGATIVES[key] = encode_reports(model, negatives, device).cpu()
    return _POOLED_NEGATIVES[key].to(device)


class PairTexts:
    """Each pair's report and the fixed negatives, as the model's text side reads them.

    With a frozen tower both are pooled once per round (its output cannot
    change); with trainable text layers each term runs its report and the
    negatives through the tower, so their gradients reach those layers.

    Args:
        model: The aligned model, on ``device``.
        run_cfg: The run config (``align.dp_negatives``, ``dp_num_negatives``, ``text_trainable_layers``).
        reports: The site's distinct prepared reports.
        device: Where the model runs.
    """

    def __init__(self, model: AlignedModel, run_cfg: Any, reports: list[str], device: torch.device) -> None:
        self.model, self.reports, self.device = model, reports, device
        negatives = negative_texts(run_cfg)
        self.pooled: Tensor | None = None
        self.negative_pooled: Tensor | None = None
        self.negative_tokens: dict[str, Tensor] = {}
        if run_cfg.align.text_trainable_layers == 0:
            self.pooled = encode_reports(model, reports, device)  # R, H
            self.negative_pooled = pooled_negatives(model, run_cfg, negatives, device)  # K, H
        else:
            self.negative_tokens = {k: v.to(device) for k, v in model.text_tower.tokenize(negatives).items()}

    def report(self, unit: int) -> Tensor:
        """Report ``unit``'s embedding (E,)."""
        if self.pooled is not None:
            return self.model.encode_text(pooled=self.pooled[unit:unit + 1])[0]
        tokens = self.model.text_tower.tokenize([self.reports[unit]])
        return self.model.encode_text(tokens["input_ids"].to(self.device),
                                      tokens["attention_mask"].to(self.device))[0]

    def negatives(self) -> Tensor:
        """The fixed negatives' embeddings (K, E)."""
        if self.negative_pooled is not None:
            return self.model.encode_text(pooled=self.negative_pooled)
        return self.model.encode_text(self.negative_tokens["input_ids"], self.negative_tokens["attention_mask"])


def pair_loss(model: AlignedModel, texts: PairTexts, seen: list[dict[str, float]] | None = None
              ) -> Callable[[dict[str, Tensor], Pair], Tensor]:
    """``loss(params, pair)``: one pair's fixed-negative loss, reading nothing of any other pair.

    ``params`` are the model's own trainable parameters (the loop of
    :func:`~fedmri.client.privacy.dp_sgd.per_sample_grads` differentiates with
    respect to them). Each call appends ``{"align_loss": value}`` to ``seen`` when given.
    """
    bias = model.logit_bias  # SigLIP's; None for CLIP

    def loss(params: dict[str, Tensor], pair: Pair) -> Tensor:
        image, unit = pair
        value = fixed_negative_loss(model.encode_image(image[None])[0], texts.report(unit), texts.negatives(),
                                    model.scale(), bias)
        if seen is not None:
            seen.append({"align_loss": float(value.detach())})
        return value

    return loss


def dp_align_step(model: AlignedModel, pairs: Sequence[Pair], texts: PairTexts, *, max_grad_norm: float,
                  noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                  extra_grad: Callable[[], dict[str, Tensor]] | None = None,
                  seen: list[dict[str, float]] | None = None, units: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Write one DP-SGD gradient of the trainable weights into ``.grad``; returns the private part.

    Args:
        model: The aligned model.
        pairs: The step's pairs (may be empty: the noise is still added).
        texts: Reports and negatives (:class:`PairTexts`).
        max_grad_norm, noise_multiplier, expected_batch_size, generator: The DP-SGD mechanism.
        extra_grad: A data-independent gradient added after the noise (FedProx).
        seen: Receives each pair's loss.
        units: Each pair's patient position in the step (patient-level DP); None: each pair alone.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Each pair's term reads that pair and the fixed public negatives only.
    return dp_step(pair_loss(model, texts, seen), params, list(pairs), max_grad_norm=max_grad_norm,
                   noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, generator=generator,
                   per_sample_decomposable=True, extra_grad=extra_grad, units=units)


def dp_align_loop(model: AlignedModel, dataset: Any, pairs: PrivatePairs, texts: PairTexts, plan: Any,
                  device: torch.device, optimizer: torch.optim.Optimizer, proximal: Any, queue_size: int = 0,
                  num_workers: int = 0) -> dict[str, float]:
    """``plan.steps`` DP-SGD steps on Poisson batches of the units; the mean loss over the pairs seen.

    Args:
        model: The aligned model on ``device``, in train mode.
        dataset: The site's training series.
        pairs: The round's pairs (:func:`private_pairs`).
        texts: Reports and negatives (:class:`PairTexts`).
        plan: The round's :class:`~fedmri.client.privacy.gate.DPPlan`, planned on ``pairs.patient``
            (its members index the pairs).
        optimizer: Over the model's trainable parameters, rates set.
        proximal: The FedProx term (its gradient is added after the noise).
        queue_size: The run's ``align.queue_size``; the queue stays off (logged when asked for).
        num_workers: Data-loading workers.
    """
    if plan.samples != len(pairs):
        raise ValueError(f"the plan counts {plan.samples} pairs, the site has {len(pairs)}")
    if queue_size:
        log.info("DP-SGD: the text queue would hold other pairs' reports; it is off for this round")
    batches = unit_batches(plan.members, plan.sample_rate, plan.steps, plan.seed)
    rng = np.random.default_rng(derive_seed(plan.seed, "series"))
    series = [[int(rng.choice(pairs.series[p])) for p in drawn] for drawn, _ in batches]
    generator = noise_generator(plan.seed, device)
    seen: list[dict[str, float]] = []
    for (drawn, units), images in zip(batches, load_batches(dataset, series, series_image,
                                                            derive_seed(plan.seed, "draws"), num_workers)):
        step = [(image.to(device), pairs.report[p]) for image, p in zip(images, drawn)]
        optimizer.zero_grad(set_to_none=True)
        dp_align_step(model, step, texts, max_grad_norm=plan.max_grad_norm, noise_multiplier=plan.noise_multiplier,
                      expected_batch_size=plan.expected_batch_size, generator=generator,
                      extra_grad=proximal.named_gradients, seen=seen, units=units)
        optimizer.step()
    means = mean_losses(seen)
    return means | {"loss": means["align_loss"]} if means else {}
