"""Local self-supervised steps at a site (DINOv2 recipe, one round).

The coordinator sends the student, the teacher and the centres; the site
runs ``local-steps`` AdamW steps on multi-crop views of its training series,
moves its copy of the teacher by EMA after each step as DINOv2 does (so the
distillation target follows the student within the round), and sends back
the student and the centres. The teacher stays with the coordinator, which
advances it from the aggregated student (:mod:`fedmri.wire`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

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
from fedmri.client.trainers.optim import RunningMean, finish_round, local_step, round_optimizer
from fedmri.client.trainers.data import patient_keys, site_dataset
from fedmri.client.trainers.speed import Speed
from fedmri.ssl import SSLMetaArch, build_mask_generator, build_multicrop, collate_multicrop, sample_masks
from fedmri.wire import State, load_ssl_state, select, ssl_state, stage_groups


class MultiCropTransform:
    """Sample dict -> multi-crop views of its image, seeded per draw (picklable for workers)."""

    def __init__(self, run_cfg: DictConfig, keep_image: bool = False) -> None:
        self.augment = build_multicrop(run_cfg)
        self.keep_image = keep_image

    def __call__(self, sample: dict[str, Any], seed: int) -> dict[str, Any]:
        crops = self.augment.set_random_state(seed=seed)(sample["image"])
        return {"crops": crops, "image": sample["image"]} if self.keep_image else {"crops": crops}


def stack_crops(draws: list[dict[str, Any]]) -> dict[str, Tensor | None]:
    """The loader's collate: a batch's views stacked crop-major, ``masks`` None.

    The masks are drawn afterwards in the training process, from the round's one
    mask generator, so they do not depend on which worker stacked the batch.
    """
    return collate_multicrop([d["crops"] for d in draws])


def min_ssl_batch(run_cfg: DictConfig) -> int:
    """KoLeo needs a nearest neighbour in the batch: 2 samples; otherwise 1."""
    return 2 if run_cfg.ssl.koleo_loss_weight > 0 else 1


def build_ssl_model(run_cfg: DictConfig, state_down: State, stage: str) -> SSLMetaArch:
    """The SSL meta-architecture of ``run_cfg`` holding exactly the stage's down weights.

    Raises:
        RequestError: The state lacks a key, has an extra one or a wrong shape.
    """
    meta = SSLMetaArch(run_cfg)
    expected = select(ssl_state(meta), stage_groups(stage, run_cfg).down)
    check_state_keys(state_down, expected, stage)
    load_ssl_state(meta, state_down)
    return meta


def named_ssl_losses(losses: dict[str, Tensor]) -> dict[str, float]:
    """``dino_loss`` (local + global crops), ``ibot_loss``, ``koleo_loss`` and their sum ``loss``."""
    out: dict[str, float] = {}
    losses = {k: v.detach() for k, v in losses.items()}
    dino = [v for k, v in losses.items() if k.startswith("dino_")]
    if dino:
        out["dino_loss"] = float(sum(dino))
    for key in ("ibot_loss", "koleo_loss"):
        if key in losses:
            out[key] = float(losses[key])
    out["loss"] = float(sum(losses.values()))
    return out


def to_device(crops: dict[str, Tensor | None], device: torch.device) -> dict[str, Tensor | None]:
    return {k: None if v is None else v.to(device, non_blocking=True) for k, v in crops.items()}


def run_pretrain(
    site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest,
    privacy: PrivacyGate | None = None
) -> tuple[State, dict[str, float]]:
    """One round of local DINO + iBOT + KoLeo training on the site's train split.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config (model and ssl sections; train: precision, compile).
        state_down: Wire tensors of the pretrain down groups (student, teacher, centres).
        request: The round's request; uses ``local_steps``, ``lr``,
            ``weight_decay``, ``teacher_temp``, ``teacher_momentum``, ``proximal_mu``,
            and the ``dp`` fields: with ``dp`` the round runs DP-SGD
            (:mod:`fedmri.client.trainers.pretrain_dp`).
        privacy: The round's :class:`~fedmri.client.privacy.gate.PrivacyGate`, which
            plans the DP-SGD mechanism and checks the site's budget; required for a DP
            round (the ClientApp makes it).

    Returns:
        The pretrain up groups (``encoder``, ``dino_head``, ``center``) as
        float32 CPU tensors, and metrics: ``num-examples`` (samples seen),
        ``steps``, the mean over steps of ``dino_loss``, ``ibot_loss``,
        ``koleo_loss`` (those switched on), ``loss``, and ``proximal_loss``
        when FedProx is on.

    Raises:
        DeclineError: Too few training series, or training diverged.
        RequestError: Weights that do not fit the run's model.
    """
    if request.stage != "pretrain":
        raise ValueError(f"run_pretrain got a {request.stage!r} request")
    device = site_device(site_cfg)
    speed = Speed.for_round(run_cfg.train, device, "pretrain", private=request.dp)
    dataset = site_dataset(site_cfg, "train")
    if request.dp:
        return _run_private(site_cfg, run_cfg, state_down, request, privacy, dataset, device)
    need = min_ssl_batch(run_cfg)
    if len(dataset) < need:
        raise DeclineError(f"pretrain needs at least {need} series in the site's train split")
    batch_size = min(int(site_cfg.batch_size), len(dataset))
    if batch_size < need:
        raise DeclineError(f"site batch_size {site_cfg.batch_size} is below the {need} samples the KoLeo term needs")
    seed = round_seed(request, site_cfg.name)
    s = run_cfg.ssl
    with seeded(seed, device):
        meta = build_ssl_model(run_cfg, state_down, "pretrain").to(device).train()
        speed.compile_modules([meta.student["backbone"], meta.teacher["backbone"]])
        masker = build_mask_generator(run_cfg) if meta.ibot_loss is not None else None
        mask_rng = np.random.default_rng(derive_seed(seed, "masks"))
        batches = balanced_batches(len(dataset), batch_size, request.local_steps,
                                   np.random.default_rng(derive_seed(seed, "batches")))
        optimizer, proximal = round_optimizer(meta.param_groups(), meta.student.named_parameters(), request)
        params = [p for p in meta.student.parameters() if p.requires_grad]
        means = RunningMean()
        loader = load_batches(dataset, batches, MultiCropTransform(run_cfg), seed, site_cfg.num_workers,
                              stack_crops, speed.pin_memory)
        for crops in loader:
            if masker is not None:
                crops["masks"] = sample_masks(len(crops["global_crops"]), masker, s.mask_sample_probability,
                                              s.mask_ratio_min_max, mask_rng)
            crops = to_device(crops, device)
            with speed.autocast():
                losses = meta(crops, crops["masks"], request.teacher_temp)
            named = local_step(optimizer, sum(losses.values()), named_ssl_losses(losses), proximal,
                               (params, s.clip_grad) if s.clip_grad > 0 else None)
            meta.update_teacher(request.teacher_momentum)
            means.add(named)
    return _finish(meta, run_cfg, means.means(), len(batches) * batch_size, len(batches))


def _run_private(site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest,
                 privacy: Any, dataset: Any, device: torch.device) -> tuple[State, dict[str, float]]:
    """One round of DP-SGD pretraining (see :mod:`fedmri.client.trainers.pretrain_dp`)."""
    from fedmri.client.trainers.pretrain_dp import dp_pretrain_loop, make_private

    if len(dataset) < 1:
        raise DeclineError("pretrain needs at least 1 series in the site's train split")
    public = _public_series(site_cfg, run_cfg)
    plan = require_gate(privacy, request).plan(patient_keys(dataset), min(int(site_cfg.batch_size), len(dataset)))
    with seeded(plan.seed, device):
        meta = build_ssl_model(run_cfg, state_down, "pretrain").to(device).train()
        make_private(meta, public_koleo=public is not None)
        optimizer, proximal = round_optimizer(meta.param_groups(), meta.student.named_parameters(), request)
        metrics = dp_pretrain_loop(meta, dataset, run_cfg, request, plan, device, optimizer, proximal,
                                   site_cfg.num_workers, public=public)
    # The expected number of series seen: the sampled one would tell the Poisson draws.
    return _finish(meta, run_cfg, metrics, round(plan.steps * plan.expected_samples), plan.steps)


def _public_series(site_cfg: DictConfig, run_cfg: DictConfig) -> Any:
    """The site's public series when the round computes KoLeo on them (``ssl.dp_public_koleo``); else None.

    Raises:
        DeclineError: The round asks for them and the site has no public catalog, or an empty one.
    """
    from fedmri.client.trainers.pretrain_dp import public_koleo_weight

    if not run_cfg.ssl.dp_public_koleo.enabled or public_koleo_weight(run_cfg.ssl) <= 0:
        return None
    if not site_cfg.get("public_catalog"):
        raise DeclineError("this round computes KoLeo on public series (ssl.dp_public_koleo) and the site file names "
                           "no public_catalog: index a public dataset with `fedmri data index` and name it there")
    from fedmri.data.dataset import SeriesDataset

    try:
        public = SeriesDataset(site_cfg.public_catalog, None)
    except Exception as exc:  # noqa: BLE001 -- any unreadable catalog: one clear reason
        raise DeclineError(f"the site's public_catalog {site_cfg.public_catalog} cannot be read ({exc}); "
                           "index it with `fedmri data index`") from None
    if len(public) < 2:
        raise DeclineError(f"the site's public_catalog {site_cfg.public_catalog} holds {len(public)} series; "
                           "KoLeo needs at least 2")
    return public


def _finish(meta: SSLMetaArch, run_cfg: DictConfig, metrics: dict[str, float], examples: int,
            steps: int) -> tuple[State, dict[str, float]]:
    return finish_round(select(ssl_state(meta), stage_groups("pretrain", run_cfg).up), metrics, examples, steps,
                        "pretrain")
