"""Site evaluation of the global model on one split: SSL losses and image-report retrieval.

Deterministic: the crops and masks are seeded from the run seed, the split
and the site name, not the round, so every round scores the same views and
the loss curve measures the model, not the draw. Only aggregate numbers come
back: mean losses, recall fractions and median ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from fedmri.align import AlignedModel, retrieval_metrics
from fedmri.client.trainers.align import build_site_aligned_model, report_pairs
from fedmri.client.trainers.batches import load_batches
from fedmri.client.trainers.context import (
    DeclineError,
    TrainRequest,
    check_state_keys,
    derive_seed,
    seeded,
    site_device,
)
from fedmri.client.trainers.optim import RunningMean
from fedmri.client.trainers.pretrain import (
    MultiCropTransform,
    min_ssl_batch,
    named_ssl_losses,
    to_device,
)
from fedmri.client.trainers.data import site_dataset
from fedmri.ssl import SSLMetaArch, build_mask_generator, collate_multicrop, ssl_schedule
from fedmri.wire import (
    ENCODER,
    HEAD_PREFIX,
    SSL_GROUPS,
    State,
    align_state,
    load_align_state,
    load_ssl_state,
    select,
    ssl_state,
    stage_groups,
)

RETRIEVAL_KEYS = {f"{d}_R@{k}": f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
    "i2t_median_rank": "i2t_medr", "t2i_median_rank": "t2i_medr"}


@contextlib.contextmanager
def _koleo_off(meta: SSLMetaArch, off: bool) -> Iterator[None]:
    # KoLeo needs two samples; a one-series split is scored without it.
    saved = meta.koleo_loss
    if off:
        meta.koleo_loss = None
    try:
        yield
    finally:
        meta.koleo_loss = saved


def _chunks(n: int, batch_size: int) -> list[list[int]]:
    # Near-equal chunks of at least batch_size (all of them when n < batch_size), never a lone
    # trailing sample that KoLeo could not score.
    return [c.tolist() for c in np.array_split(np.arange(n), max(1, n // batch_size))]


def run_evaluate(
    site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest
) -> dict[str, float]:
    """Score the global model on the site's ``request.split``.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config.
        state_down: Wire tensors of the evaluate down groups (SSL model,
            projections, logit scale, trainable text layers).
        request: The request; uses ``split``, ``seed`` and, when sent,
            ``teacher_temp`` (default: the run's final teacher temperature).

    Returns:
        ``num-examples`` (series in the split); ``<split>_dino_loss``,
        ``<split>_ibot_loss``, ``<split>_koleo_loss`` (those switched on) and
        ``<split>_loss``, means over the split; ``num-pairs`` (series with a
        report) and, when it is > 0, ``i2t_r1``, ``i2t_r5``, ``i2t_r10``,
        ``i2t_medr`` and the same for ``t2i``.

    Raises:
        DeclineError: The split is empty.
        RequestError: Weights that do not fit the run's model.
    """
    if request.stage != "evaluate":
        raise ValueError(f"run_evaluate got a {request.stage!r} request")
    device = site_device(site_cfg)
    split = request.split
    dataset = site_dataset(site_cfg, split)
    n = len(dataset)
    if n == 0:
        raise DeclineError(f"the site's {split} split holds no series")
    reports, owner = report_pairs(dataset)
    teacher_temp = request.teacher_temp or ssl_schedule(run_cfg, 1.0)["teacher_temp"]
    seed = derive_seed(request.seed, "evaluate", split, site_cfg.name)
    s = run_cfg.ssl
    with seeded(seed, device), torch.no_grad():
        meta = SSLMetaArch(run_cfg)
        aligned = build_site_aligned_model(run_cfg, image_encoder=meta.student["backbone"])
        down = [g for g in stage_groups("evaluate", run_cfg).down if not g.startswith(HEAD_PREFIX)]
        heads = {k: v for k, v in state_down.items() if k.startswith(HEAD_PREFIX)}  # checked by evaluate_heads
        check_state_keys(select(state_down, down), select(ssl_state(meta) | align_state(aligned), down), "evaluate")
        load_ssl_state(meta, select(state_down, SSL_GROUPS))
        load_align_state(aligned, select(state_down, [g for g in down if g not in SSL_GROUPS]))  # encoder: shared
        meta.to(device).eval()
        aligned.to(device).eval()
        masker = build_mask_generator(run_cfg) if meta.ibot_loss is not None else None
        mask_rng = np.random.default_rng(derive_seed(seed, "masks"))
        means = RunningMean()
        image_features: list[Tensor] = []
        chunks = _chunks(n, int(site_cfg.batch_size))
        loader = load_batches(dataset, chunks, MultiCropTransform(run_cfg, keep_image=True), seed,
                              site_cfg.num_workers)
        for idx, samples in zip(chunks, loader):
            crops = to_device(collate_multicrop([x["crops"] for x in samples], masker, s.mask_sample_probability,
                                                s.mask_ratio_min_max, mask_rng), device)
            with _koleo_off(meta, len(samples) < min_ssl_batch(run_cfg)):
                losses = named_ssl_losses(meta(crops, crops["masks"], teacher_temp))
            means.add(losses, weight=len(samples))
            paired = [x["image"] for i, x in zip(idx, samples) if owner[i] >= 0]
            if paired:
                image_features.append(aligned.encode_image(torch.stack(paired).to(device)))  # b, E
        metrics: dict[str, float] = {"num-examples": n, **means.means(prefix=f"{split}_")}
        metrics |= knn_probe(meta.student["backbone"], site_cfg, dataset, split, device)
        targets = torch.tensor([r for r in owner if r >= 0])
        metrics["num-pairs"] = len(targets)
        if len(targets):
            text = torch.cat([aligned.encode_text(**_tokens(aligned, reports[i:i + 64], device))
                              for i in range(0, len(reports), 64)])  # R, E
            image = torch.cat(image_features)  # P, E
            scores = retrieval_metrics(image @ text.T, targets.to(device))
            metrics |= {RETRIEVAL_KEYS[k]: v for k, v in scores.items()}
    if request.evaluate_heads:
        from fedmri.client.trainers.heads import evaluate_heads

        metrics |= evaluate_heads(site_cfg, run_cfg, select(state_down, [ENCODER]) | heads, split)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise DeclineError(f"evaluation gave non-finite {', '.join(sorted(bad))}; the global model has diverged")
    return metrics


KNN_LABELS = ("sequence", "body_region")


def _cls_features(encoder: torch.nn.Module, dataset: object, batch_size: int, device: torch.device) -> Tensor:
    feats = []
    for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        feats.append(torch.nn.functional.normalize(encoder(images.to(device))["cls"], dim=-1))
    return torch.cat(feats)  # N, D


@torch.no_grad()
def knn_probe(encoder: torch.nn.Module, site_cfg: DictConfig, dataset: object, split: str,
              device: torch.device) -> dict[str, float]:
    """1-nearest-neighbour accuracy of sequence and body region from the encoder's CLS features.

    References are the site's training series (leave-one-out when the split is
    the training split itself). A frozen-feature probe with no training: it
    says whether the encoder separates what a radiologist would, and it is
    comparable across federated, local and central models. Returns nothing
    when there are no references.
    """
    leave_one_out = split == "train"
    reference = dataset if leave_one_out else site_dataset(site_cfg, "train")
    if len(reference) < (2 if leave_one_out else 1):  # type: ignore[arg-type]
        return {}
    bs = int(site_cfg.batch_size)
    query = _cls_features(encoder, dataset, bs, device)
    ref = query if leave_one_out else _cls_features(encoder, reference, bs, device)
    sims = query @ ref.T  # Q, R
    if leave_one_out:
        sims.fill_diagonal_(-float("inf"))
    nearest = sims.argmax(dim=1).tolist()
    out = {}
    for label in KNN_LABELS:
        truth = [row["meta"][label] for row in dataset.rows]  # type: ignore[attr-defined]
        ref_labels = [row["meta"][label] for row in reference.rows]  # type: ignore[attr-defined]
        out[f"knn_{label}_acc"] = float(np.mean([ref_labels[j] == t for j, t in zip(nearest, truth)]))
    return out


def _tokens(model: AlignedModel, reports: list[str], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in model.text_tower.tokenize(reports).items()}
