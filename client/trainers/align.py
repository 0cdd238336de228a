"""Local image-report alignment steps at a site (CLIP or SigLIP, one round).

The site's text tower is loaded from the site's own disk, once per process
(loading it each round costs seconds). With the tower frozen, the default,
the site encodes its training reports once per round and trains the
projections (and the image encoder unless frozen) on those; with trainable
top layers each round works on a private copy of the tower.

Studies usually hold several series under one report. A step draws distinct
reports and one of each report's series, so no batch holds two copies of a
report that the contrastive loss would take for negatives of each other.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from fedmri.align import AlignedModel, build_align_objective, build_aligned_model
from fedmri.client.privacy.gate import PrivacyGate, require_gate
from fedmri.client.trainers.batches import balanced_batches, load_batches
from fedmri.client.trainers.context import (
    DeclineError,
    TrainRequest,
    check_state_keys,
    derive_seed,
    round_seed,
    seeded,
    site_device,
)
from fedmri.client.trainers.optim import RunningMean, decay_groups, finish_round, local_step, round_optimizer
from fedmri.client.trainers.data import site_dataset
from fedmri.client.trainers.speed import Speed
from fedmri.data.dataset import SeriesDataset
from fedmri.errors import InputError
from fedmri.text import TextTower, build_text_tower, prepare_report
from fedmri.wire import State, align_state, load_align_state, select, stage_groups

_TOWERS: dict[tuple[str, str, int], TextTower] = {}
_ENCODE_CHUNK = 64  # reports per text-tower forward when encoding a whole split


def text_tower(run_cfg: DictConfig) -> TextTower:
    """The run's text tower, frozen, loaded once per process and shared: do not train it in place."""
    a = run_cfg.align
    key = (str(a.text_model), str(a.text_pooling), int(a.max_tokens))
    if key not in _TOWERS:
        _TOWERS[key] = build_text_tower(a)
    return _TOWERS[key]


def build_site_aligned_model(run_cfg: DictConfig, image_encoder: Any = None) -> AlignedModel:
    """The aligned model of ``run_cfg`` on the cached tower (a private copy when text layers train)."""
    tower = text_tower(run_cfg)
    if run_cfg.align.text_trainable_layers != 0:
        tower = copy.deepcopy(tower)
    return build_aligned_model(run_cfg, image_encoder=image_encoder, text_tower=tower)


def report_pairs(dataset: SeriesDataset) -> tuple[list[str], list[int]]:
    """Distinct prepared reports, and for each series the index of its report (-1 = none).

    Reads the catalog rows only, not the images.
    """
    reports: dict[str, int] = {}
    owner: list[int] = []
    for row in dataset.rows:
        try:
            text = prepare_report(**row["report_sections"])
        except InputError:  # no findings or impression text
            owner.append(-1)
            continue
        owner.append(reports.setdefault(text, len(reports)))
    return list(reports), owner


@torch.no_grad()
def encode_reports(model: AlignedModel, reports: list[str], device: torch.device) -> Tensor:
    """Pooled tower output (R, H) of every report, for a frozen tower."""
    parts = []
    for i in range(0, len(reports), _ENCODE_CHUNK):
        tokens = model.text_tower.tokenize(reports[i:i + _ENCODE_CHUNK])
        parts.append(model.text_tower(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))
    return torch.cat(parts)  # R, H


def series_image(sample: dict[str, Any], seed: int) -> Tensor:
    """The series' volume (1, X, Y, Z): alignment steps do not augment."""
    return sample["image"]  # 1, X, Y, Z


def stack_images(images: list[Tensor]) -> Tensor:
    """The loader's collate: a batch's volumes as one (B, 1, X, Y, Z) tensor."""
    return torch.stack(images)  # B, 1, X, Y, Z


def site_aligned_model(run_cfg: DictConfig, state_down: State, device: torch.device) -> AlignedModel:
    """The run's aligned model with the round's weights, on ``device``, in train mode.

    Raises:
        RequestError: Weights that do not fit the run's model.
    """
    model = build_site_aligned_model(run_cfg)
    check_state_keys(state_down, select(align_state(model), stage_groups("align", run_cfg).down), "align")
    load_align_state(model, state_down)
    return model.to(device).train()


def run_align(
    site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest,
    privacy: PrivacyGate | None = None
) -> tuple[State, dict[str, float]]:
    """One round of local contrastive alignment on the site's training image-report pairs.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config (model and align sections; train: precision, compile).
        state_down: Wire tensors of the align down groups.
        request: The round's request; uses ``local_steps``, ``lr``,
            ``weight_decay``, ``proximal_mu``, and the ``dp`` fields: with ``dp``
            the round runs DP-SGD on fixed negatives
            (:mod:`fedmri.client.trainers.align_dp`).
        privacy: The round's :class:`~fedmri.client.privacy.gate.PrivacyGate`, which
            plans the DP-SGD mechanism and checks the site's budget; required for a DP
            round (the ClientApp makes it).

    Returns:
        The align up groups as float32 CPU tensors, and metrics:
        ``num-examples`` (pairs seen; under DP the expected number), ``steps``, the mean over steps of
        ``align_loss`` and ``loss``, ``proximal_loss`` when FedProx is on, and
        the final ``logit_scale`` (exp of the clamped parameter).

    Raises:
        DeclineError: Fewer than 2 distinct reports with images (1 under DP), divergence,
            DP with in-batch negatives (``align.dp_negatives: none``), or a DP round past the budget.
        RequestError: Weights that do not fit the run's model.
    """
    if request.stage != "align":
        raise ValueError(f"run_align got a {request.stage!r} request")
    if request.dp:
        from fedmri.client.trainers.align_dp import require_dp_align

        require_dp_align(run_cfg, f"align round {request.round}")
    device = site_device(site_cfg)
    speed = Speed.for_round(run_cfg.train, device, "align", private=request.dp)
    dataset = site_dataset(site_cfg, "train")
    reports, owner = report_pairs(dataset)
    series_of = [[i for i, r in enumerate(owner) if r == u] for u in range(len(reports))]
    if request.dp:
        return _run_private(site_cfg, run_cfg, state_down, request, privacy, dataset, reports, series_of, device)
    if len(reports) < 2:
        raise DeclineError("align needs image-report pairs with at least 2 different reports in the "
                           "site's train split")
    batch_size = min(int(site_cfg.batch_size), len(reports))
    if batch_size < 2:
        raise DeclineError(f"site batch_size {site_cfg.batch_size} is below the 2 pairs a contrastive step needs")
    seed = round_seed(request, site_cfg.name)
    with seeded(seed, device):
        model = site_aligned_model(run_cfg, state_down, device)
        speed.compile_modules([model.image_encoder])
        objective = build_align_objective(run_cfg).to(device)
        rng = np.random.default_rng(derive_seed(seed, "batches"))
        unit_batches = balanced_batches(len(reports), batch_size, request.local_steps, rng)
        series_batches = [[int(rng.choice(series_of[u])) for u in b] for b in unit_batches]
        frozen_text = run_cfg.align.text_trainable_layers == 0
        pooled = encode_reports(model, reports, device) if frozen_text else None  # R, H
        optimizer, proximal = round_optimizer(decay_groups(model.named_parameters()), model.named_parameters(),
                                              request)
        means = RunningMean()
        loader = load_batches(dataset, series_batches, series_image, seed, site_cfg.num_workers, stack_images,
                              speed.pin_memory)
        for units, images in zip(unit_batches, loader):
            images = images.to(device, non_blocking=True)  # B, 1, X, Y, Z
            with speed.autocast():
                if pooled is not None:
                    out = model(images, text_pooled=pooled[units])
                else:
                    tokens = model.text_tower.tokenize([reports[u] for u in units])
                    out = model(images, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
                losses = objective(out)
            total = sum(losses.values())
            named = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(total.detach())}
            means.add(local_step(optimizer, total, named, proximal))
    return _finish(model, run_cfg, means.means(), len(unit_batches) * batch_size, len(unit_batches))


def _run_private(site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest,
                 privacy: Any, dataset: Any, reports: list[str], series_of: list[list[int]],
                 device: torch.device) -> tuple[State, dict[str, float]]:
    """One round of DP-SGD alignment on fixed negatives (see :mod:`fedmri.client.trainers.align_dp`)."""
    from fedmri.client.trainers.align_dp import PairTexts, dp_align_loop, private_pairs
    from fedmri.client.trainers.data import patient_keys

    if not reports:
        raise DeclineError("align needs image-report pairs in the site's train split")
    gate = require_gate(privacy, request)
    pairs = private_pairs(series_of, patient_keys(dataset), gate.unit)
    plan = gate.plan(pairs.patient, min(int(site_cfg.batch_size), len(pairs)))
    with seeded(plan.seed, device):
        model = site_aligned_model(run_cfg, state_down, device)
        texts = PairTexts(model, run_cfg, reports, device)
        optimizer, proximal = round_optimizer(decay_groups(model.named_parameters()), model.named_parameters(),
                                              request)
        metrics = dp_align_loop(model, dataset, pairs, texts, plan, device, optimizer, proximal,
                                int(run_cfg.align.queue_size), site_cfg.num_workers)
    # The expected number of pairs seen: the sampled one would tell the Poisson draws.
    return _finish(model, run_cfg, metrics, round(plan.steps * plan.expected_samples), plan.steps)


def _finish(model: AlignedModel, run_cfg: DictConfig, metrics: dict[str, float], examples: int,
            steps: int) -> tuple[State, dict[str, float]]:
    metrics = metrics | {"logit_scale": float(model.scale().detach())}
    return finish_round(select(align_state(model), stage_groups("align", run_cfg).up), metrics, examples, steps,
                        "align")
