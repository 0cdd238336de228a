"""Site evaluation of the global model on one split: SSL losses, image-report retrieval and
zero-shot findings through the aligned space (:mod:`fedmri.align.zeroshot`).

Deterministic: the crops and masks are seeded from the run seed, the split
and the site name, not the round, so every round scores the same views and
the loss curve measures the model, not the draw. Only aggregate numbers come
back: mean losses, recall fractions, median ranks and AUROCs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from fedmri.align import AlignedModel, retrieval_metrics
from fedmri.align.zeroshot import prompt_embeddings, zeroshot_metrics, zeroshot_scores
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
from fedmri.heads.tasks import TASKS
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
    site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest, *, privacy: Any = None
) -> tuple[State, dict[str, float]]:
    """Score the global model on the site's ``request.split``: no weights go back, so the update is empty.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config.
        state_down: Wire tensors of the evaluate down groups (SSL model,
            projections, logit scale, trainable text layers).
        request: The request; uses ``split``, ``seed`` and, when sent,
            ``teacher_temp`` (default: the run's final teacher temperature).

        privacy: Unused (an evaluation releases only metrics); the trainers' common signature.

    Returns:
        An empty update and the metrics: ``num-examples`` (series in the split); ``<split>_dino_loss``,
        ``<split>_ibot_loss``, ``<split>_koleo_loss`` (those switched on) and
        ``<split>_loss``, means over the split; ``num-pairs`` (series with a
        report) and, when it is > 0, ``i2t_r1``, ``i2t_r5``, ``i2t_r10``,
        ``i2t_medr`` and the same for ``t2i``; where the split has known
        findings labels, the heads' findings AUROCs of text-prompt scores
        (no head), prefixed ``zeroshot_``: ``zeroshot_findings_auroc_macro``,
        ``zeroshot_findings_auroc_in_region_macro`` (each with ``_ci_low`` and
        ``_ci_high``, over resamples of the site's patients) and per finding
        ``zeroshot_findings_auroc/<code>``,
        ``zeroshot_findings_auroc_in_region/<code>``.

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
        findings = _findings_targets(dataset, request)
        embedded: list[Tensor] = []  # aligned image embeddings: every series for zero-shot, else the paired ones
        embedded_rows: list[int] = []
        chunks = _chunks(n, int(site_cfg.batch_size))
        loader = load_batches(dataset, chunks, MultiCropTransform(run_cfg, keep_image=True), seed,
                              site_cfg.num_workers)
        for idx, samples in zip(chunks, loader):
            crops = to_device(collate_multicrop([x["crops"] for x in samples], masker, s.mask_sample_probability,
                                                s.mask_ratio_min_max, mask_rng), device)
            with _koleo_off(meta, len(samples) < min_ssl_batch(run_cfg)):
                losses = named_ssl_losses(meta(crops, crops["masks"], teacher_temp))
            means.add(losses, weight=len(samples))
            keep = [j for j, i in enumerate(idx) if findings is not None or owner[i] >= 0]
            if keep:
                images = torch.stack([samples[j]["image"] for j in keep]).to(device)
                embedded.append(aligned.encode_image(images))  # b, E
                embedded_rows += [idx[j] for j in keep]
        metrics: dict[str, float] = {"num-examples": n, **means.means(prefix=f"{split}_")}
        metrics |= knn_probe(meta.student["backbone"], site_cfg, dataset, split, device)
        image = torch.cat(embedded) if embedded else torch.zeros(0, 1)  # M, E in dataset order
        report_of = torch.tensor([owner[i] for i in embedded_rows], dtype=torch.long)  # M
        paired = report_of >= 0
        metrics["num-pairs"] = int(paired.sum())
        if paired.any():
            text = torch.cat([aligned.encode_text(**_tokens(aligned, reports[i:i + 64], device))
                              for i in range(0, len(reports), 64)])  # R, E
            scores = retrieval_metrics(image[paired.to(image.device)] @ text.T, report_of[paired].to(device))
            metrics |= {RETRIEVAL_KEYS[k]: v for k, v in scores.items()}
        if findings is not None:
            metrics |= zeroshot_findings(aligned, image, dataset.rows, findings, device, seed=int(run_cfg.seed))
    if request.evaluate_heads:
        from fedmri.client.trainers.heads import evaluate_heads

        metrics |= evaluate_heads(site_cfg, run_cfg, select(state_down, [ENCODER]) | heads, split)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise DeclineError(f"evaluation gave non-finite {', '.join(sorted(bad))}; the global model has diverged")
    return {}, metrics


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


def _findings_targets(dataset: Any, request: TrainRequest) -> tuple[Tensor, Tensor] | None:
    """The split's findings targets and known mask (N, L), (N,); None when zero-shot is not scored.

    It is not scored on a split with no known findings label, nor when the
    coordinator says that no align stage came before this evaluation (the
    ``evaluate_aligned`` flag, like ``evaluate_heads``): unaligned projections
    score at chance. A request without the flag is scored, as retrieval is.
    """
    if not request.evaluate_aligned:
        return None
    target, known = TASKS["findings"].targets(dataset.rows)
    return (target, known) if bool(known.any()) else None


def zeroshot_findings(aligned: AlignedModel, images: Tensor, rows: list[dict[str, Any]],
                      findings: tuple[Tensor, Tensor], device: torch.device, seed: int) -> dict[str, float]:
    """Findings AUROCs of text prompts scored against the aligned image embeddings, no head.

    Args:
        aligned: The global aligned model (its text side embeds the prompts).
        images: (N, E) aligned embeddings of every series of the split, in row order.
        rows: The split's catalog rows (body region, patient).
        findings: Targets and known mask from the rows.
        device: Where ``aligned`` is.
        seed: Bootstrap seed (the run's, as the heads' intervals use).

    Returns:
        The ``zeroshot_findings_*`` metrics of :func:`fedmri.align.zeroshot.zeroshot_metrics`.
    """
    positive, negative = prompt_embeddings(lambda texts: aligned.encode_text(**_tokens(aligned, texts, device)))
    scores = zeroshot_scores(images, positive, negative).cpu()  # N, L
    regions = [str(row["meta"]["body_region"]) for row in rows]
    patients = [str(row["meta"]["patient_id"]) for row in rows]
    return zeroshot_metrics(scores, *findings, regions, patients, seed=seed)


def _tokens(model: AlignedModel, reports: list[str], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in model.text_tower.tokenize(reports).items()}
