"""The ``heads`` stage at a site: light task heads tuned on features of the frozen global encoder.

Each site puts its series through the round's encoder once; the pooled
features are cached on disk under the encoder's weight digest
(:class:`fedmri.heads.FeatureCache`), so every later round with the same
encoder reads them and a new encoder recomputes. A local step then costs a
few small matrix products, and only the head groups (``head.<task>``) go back.

All tasks train together: the step's loss is the sum over tasks of each task's
mean loss over the series whose label is known (:mod:`fedmri.heads.tasks`).
Under DP-SGD a series' term is the sum over tasks of its masked losses: a
sum of per-sample terms, clipped per patient (the sum of the patient's
series' gradients, ``policy.dp.unit: patient``) or per series (``series``).
The dense tasks (segmentation, anomaly: lesion masks on cached patch tokens)
join the same steps through :mod:`fedmri.client.trainers.heads_dense`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fedmri.client.privacy.gate import PrivacyGate, require_gate
from fedmri.client.trainers.batches import balanced_batches
from fedmri.client.trainers.context import (
    DeclineError,
    TrainRequest,
    check_state_keys,
    derive_seed,
    round_seed,
    seeded,
    site_device,
)
from fedmri.client.trainers.data import patient_keys, site_dataset
from fedmri.client.trainers.heads_dense import DenseData, cache_options, dense_data, lesion_rows
from fedmri.client.trainers.optim import Proximal, RunningMean, decay_groups, finish_round, local_step, round_optimizer
from fedmri.heads.dense import dense_tasks
from fedmri.heads.intervals import task_intervals
from fedmri.heads.mlp import pool_features
from fedmri.heads.tasks import TASKS, TRUNK, build_task_heads, load_task_heads_state, task_heads_state, task_outputs
from fedmri.wire import ENCODER, HEAD_PREFIX, SEP, State, select

# Per task: (target, known) of every series, in dataset order.
Targets = dict[str, tuple[Tensor, Tensor]]


def _frozen_encoder(run_cfg: DictConfig, state: State, device: torch.device) -> nn.Module:
    """The run's encoder with the ``encoder/...`` weights of ``state``, in eval mode on ``device``.

    Raises:
        RequestError: Encoder weights that do not fit the run's model.
    """
    from fedmri.models import build_encoder

    encoder = build_encoder(run_cfg.model)
    expected = {f"{ENCODER}{SEP}{k}": v for k, v in encoder.state_dict().items()}
    check_state_keys(select(state, [ENCODER]), expected, "heads encoder")
    encoder.load_state_dict({k[len(ENCODER) + 1:]: v for k, v in select(state, [ENCODER]).items()})
    return encoder.to(device).eval().requires_grad_(False)


def cache_root(site_cfg: DictConfig, run_cfg: DictConfig) -> Path:
    """``heads.cache_dir``, resolved against the site's catalog folder when relative."""
    root = Path(str(run_cfg.heads.cache_dir)).expanduser()
    return root if root.is_absolute() else Path(str(site_cfg.catalog)) / root


def _item_ids(dataset: Any) -> list[str]:
    # Stable per volume: the series id with its cache entry (which changes when the volume is
    # re-preprocessed); pooled catalogs (centralized baseline) are told apart by their folder.
    parts = getattr(dataset, "parts", None)
    if parts is None:
        return [f"{r['meta']['series_id']}|{r['cache_path']}" for r in dataset.rows]
    return [f"{p.catalog_dir}|{r['meta']['series_id']}|{r['cache_path']}" for p in parts for r in p.rows]


def _cached(site_cfg: DictConfig, run_cfg: DictConfig, state: State, dataset: Any, device: torch.device) -> Any:
    # The cache stores patch tokens and layers only when a dense task is asked (cache_options).
    from fedmri.heads.features import build_feature_cache

    encoder = _frozen_encoder(run_cfg, state, device)
    cache = build_feature_cache(run_cfg, encoder, root=cache_root(site_cfg, run_cfg), **cache_options(run_cfg))
    ids = _item_ids(dataset)
    position = {item_id: i for i, item_id in enumerate(ids)}
    return cache.get(ids, lambda item_id: dataset[position[item_id]]["image"])


def _pooled(run_cfg: DictConfig, cached: Any) -> Tensor:
    return pool_features(cached.as_encoder_output(), str(run_cfg.heads.pooling)).float()  # N, F


def site_features(site_cfg: DictConfig, run_cfg: DictConfig, state: State,
                  split: str) -> tuple[Tensor, list[dict[str, Any]]]:
    """Pooled features of the frozen encoder for the site's ``split``, through the feature cache.

    Args:
        site_cfg: The site file (its catalog and device).
        run_cfg: The run config (model, ``heads.pooling``, ``heads.cache_dir``, preprocessing).
        state: Wire tensors holding at least the ``encoder`` group (other groups are ignored).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        Features (N, F) float32 on CPU, and the split's catalog rows in the same
        order (``SeriesDataset.rows``: labels and ``meta``); (0, F) for an empty split.

    Raises:
        RequestError: Encoder weights that do not fit the run's model.
    """
    dataset = site_dataset(site_cfg, split)
    if len(dataset) == 0:
        from fedmri.heads.mlp import pooled_dim

        return torch.zeros(0, pooled_dim(int(run_cfg.model.embed_dim), str(run_cfg.heads.pooling))), []
    return _pooled(run_cfg, _cached(site_cfg, run_cfg, state, dataset, site_device(site_cfg))), list(dataset.rows)


def task_targets(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Targets:
    """Each MLP task's targets and known mask over ``rows`` (see :meth:`TaskSpec.targets`); dense tasks are skipped."""
    return {t: TASKS[t].targets(rows) for t in tasks if t in TASKS}


def heads_losses(heads: nn.ModuleDict, features: Tensor, targets: Targets) -> dict[str, Tensor]:
    """Mean loss over the known rows of each task that has one, keyed ``loss_<task>``."""
    labelled = [t for t, (_, known) in targets.items() if bool(known.any())]
    outputs = task_outputs(heads, features, labelled)
    return {f"loss_{t}": TASKS[t].loss(outputs[t], *targets[t]) for t in labelled}


def _site_heads(run_cfg: DictConfig, state: State, device: torch.device) -> nn.ModuleDict:
    """The run's task heads with the ``head.<task>`` weights of ``state``, on ``device``."""
    heads = build_task_heads(run_cfg)
    head_state = select(state, [f"{HEAD_PREFIX}{t}" for t in heads])
    check_state_keys(head_state, task_heads_state(heads), "heads")
    load_task_heads_state(heads, head_state)
    return heads.to(device)


def run_heads(
    site_cfg: DictConfig, run_cfg: DictConfig, state_down: State, request: TrainRequest,
    privacy: PrivacyGate | None = None
) -> tuple[State, dict[str, float]]:
    """One round of head tuning on the frozen encoder's features of the site's train split.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config (model and heads sections).
        state_down: Wire tensors of the heads down groups: ``encoder`` and ``head.<task>``.
        request: The round's request; uses ``local_steps``, ``lr`` and ``weight_decay``
            (which a heads request always carries), ``proximal_mu`` and the ``dp`` fields.
        privacy: The round's :class:`~fedmri.client.privacy.gate.PrivacyGate` under DP;
            required for a DP round (the ClientApp makes it).

    Returns:
        The head groups as float32 CPU tensors, and metrics: ``num-examples``
        (series drawn; under DP the expected number), ``steps``, ``loss_<task>``
        (mean over steps, for the tasks with labels at the site; for the dense
        tasks, over the steps whose batch held a lesion target), ``loss`` (the
        sum of the step's task losses), ``proximal_loss`` when FedProx is on.

    Raises:
        DeclineError: An empty train split, no labels for any task, divergence, or a DP
            round past the site's budget.
        RequestError: Weights that do not fit the run's model.
    """
    if request.stage != "heads":
        raise ValueError(f"run_heads got a {request.stage!r} request")
    device = site_device(site_cfg)
    dataset = site_dataset(site_cfg, "train")
    n = len(dataset)
    if n == 0:
        raise DeclineError("the heads stage needs series in the site's train split")
    tasks = list(run_cfg.heads.tasks)
    targets = task_targets(tasks, dataset.rows)
    lesions, masked = lesion_rows(dataset) if dense_tasks(tasks) else ([], set())
    if not lesions and not any(bool(known.any()) for _, known in targets.values()):
        hint = "; segmentation and anomaly need lesion masks or series with no finding" if dense_tasks(tasks) else ""
        raise DeclineError(f"no series in the site's train split has a label for any heads task "
                           f"({', '.join(tasks)}{hint})")
    batch_size = min(int(site_cfg.batch_size), n)
    if request.dp:
        plan = require_gate(privacy, request).plan(patient_keys(dataset), batch_size)
        seed = plan.seed
    else:
        seed = round_seed(request, site_cfg.name)
    # After the budget check, so a declined round costs no encoder pass.
    cached = _cached(site_cfg, run_cfg, state_down, dataset, device)
    features = _pooled(run_cfg, cached).to(device)  # N, F
    targets = {t: (target.to(device), known.to(device)) for t, (target, known) in targets.items()}
    dense = dense_data(run_cfg, dataset, lesions, masked, cached, device) if lesions else None
    with seeded(seed, device):
        heads = _site_heads(run_cfg, state_down, device).train()
        optimizer, proximal = round_optimizer(decay_groups(heads.named_parameters()), heads.named_parameters(),
                                              request)
        if request.dp:
            means = _dp_steps(heads, features, targets, plan, optimizer, proximal, dense)
            examples, steps = round(plan.steps * plan.expected_samples), plan.steps
        else:
            batches = balanced_batches(n, batch_size, request.local_steps,
                                       np.random.default_rng(derive_seed(seed, "batches")))
            means = _local_steps(heads, features, targets, batches, optimizer, proximal, dense)
            examples, steps = len(batches) * batch_size, len(batches)
    return finish_round(task_heads_state(heads), means, examples, steps, "the heads")


def _local_steps(heads: nn.ModuleDict, features: Tensor, targets: Targets, batches: list[list[int]],
                 optimizer: torch.optim.Optimizer, proximal: Proximal, dense: DenseData | None) -> dict[str, float]:
    means = RunningMean()
    for batch in batches:
        idx = torch.tensor(batch, device=features.device)
        losses = heads_losses(heads, features[idx], {t: (y[idx], k[idx]) for t, (y, k) in targets.items()})
        if dense is not None:
            losses |= dense.losses(heads, idx)
        if not losses:  # no task has a label in this batch: nothing to step on
            continue
        total = torch.stack(list(losses.values())).sum()
        named = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(total.detach())}
        means.add(local_step(optimizer, total, named, proximal))
    return means.means()


def series_loss(heads: nn.ModuleDict, tasks: Sequence[str]) -> Any:
    """``loss(params, sample)``: one series' summed masked task losses, for per-sample DP gradients.

    ``sample`` is ``(features (F,), target of each task..., known (T,) float)``; ``params``
    are ``heads.named_parameters()`` by name. The term reads that series only.
    """
    from torch.func import functional_call

    def own(params: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        return {k[len(name) + 1:]: v for k, v in params.items() if k.startswith(f"{name}.")}

    def loss(params: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        x, *ys, known = sample
        total = x.new_zeros(())
        inputs = functional_call(heads[TRUNK], own(params, TRUNK), (x[None],)) if TRUNK in heads else x[None]  # 1, W
        for j, task in enumerate(tasks):
            out = functional_call(heads[task], own(params, task), (inputs,))  # 1, out_dim
            total = total + TASKS[task].sample_losses(out, ys[j][None])[0] * known[j]
        return total

    return loss


def _dp_steps(heads: nn.ModuleDict, features: Tensor, targets: Targets, plan: Any, optimizer: torch.optim.Optimizer,
              proximal: Proximal, dense: DenseData | None) -> dict[str, float]:
    """``plan.steps`` DP-SGD steps on Poisson batches of ``plan``'s units; the mean of each named loss over steps."""
    from fedmri.client.privacy.dp_sgd import dp_step, noise_generator, unit_batches

    tasks = list(targets)
    params = {n: p for n, p in heads.named_parameters() if p.requires_grad}
    loss_fn = series_loss(heads, tasks)
    # torch.func's vmap refuses random ops (dropout) by default; the loop handles them, and the
    # dense terms, which only the series with a lesion target have.
    vectorized = dense is None and not any(isinstance(m, nn.Dropout) and m.p > 0 for m in heads.modules())
    known = torch.stack([targets[t][1] for t in tasks], dim=1).to(features.dtype) if tasks else (
        features.new_zeros(features.shape[0], 0))  # N, T
    labelled = known.bool().any(1)  # N
    if dense is not None:
        labelled |= dense.slot.to(labelled.device) >= 0
    labelled = labelled.tolist()
    seen: list[dict[str, float]] = []
    if dense is not None:
        loss_fn = dense.series_loss(heads, loss_fn, seen)
    generator = noise_generator(plan.seed, features.device)
    means = RunningMean()
    if plan.samples != features.shape[0]:
        raise ValueError(f"the plan counts {plan.samples} series, the features {features.shape[0]}")
    for batch, units in unit_batches(plan.members, plan.sample_rate, plan.steps, plan.seed):
        # A series with no label has a zero term: leaving it out changes no sum (and a term needs a graph).
        # A drawn patient left with no series gives a zero row in sum_per_unit, which adds nothing.
        members = [i for i in batch if labelled[i]]
        owners = [u for i, u in zip(batch, units) if labelled[i]]
        samples = [(features[i], *(targets[t][0][i] for t in tasks), known[i]) for i in members]
        if dense is not None:
            samples = [(s, int(dense.slot[i])) for s, i in zip(samples, members)]
        # Each series' term is its own masked task losses: a sum of per-sample terms.
        dp_step(loss_fn, params, samples, max_grad_norm=plan.max_grad_norm, noise_multiplier=plan.noise_multiplier,
                expected_batch_size=plan.expected_batch_size, generator=generator, per_sample_decomposable=True,
                vectorized=vectorized, extra_grad=proximal.named_gradients, units=owners)
        optimizer.step()
        if batch:
            idx = torch.tensor(batch, device=features.device)
            with torch.no_grad():
                losses = heads_losses(heads, features[idx], {t: (y[idx], k[idx]) for t, (y, k) in targets.items()})
            if seen:  # this step's dense losses, from the gradient's own pass (not a second decoder pass)
                losses |= {k: sum(v[k] for v in seen) / len(seen) for k in seen[0]}
                seen.clear()
            if losses:
                means.add({k: float(v) for k, v in losses.items()} | {"loss": float(sum(losses.values()))})
    return means.means()


@torch.no_grad()
def evaluate_heads(site_cfg: DictConfig, run_cfg: DictConfig, state: State, split: str) -> dict[str, float]:
    """Score every task head on the site's ``split``.

    Args:
        site_cfg: The site file.
        run_cfg: The run config.
        state: Wire tensors with the ``encoder`` and every ``head.<task>`` group of
            ``heads.tasks`` (other groups, as in an evaluate message, are ignored).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``heads-examples`` (series scored) and ``<task>_<metric>`` for every metric
        defined at this site (see :meth:`fedmri.heads.tasks.TaskSpec.metrics`), e.g.
        ``findings_auroc_macro``, ``findings_auroc_in_region_macro`` (within the
        body regions where each finding occurs: see
        :meth:`fedmri.heads.tasks.TaskSpec.region_metrics`), ``findings_f1_macro``, ``sequence_accuracy``,
        ``sequence_f1_macro``, ``body_region_accuracy``, ``age_mae``, ``sex_auroc``,
        ``sex_accuracy``; for those in :data:`fedmri.heads.intervals.HEADLINE`, the
        95% interval over resamples of the site's patients as ``<metric>_ci_low``
        and ``<metric>_ci_high``; ``heads-patients``, the patients scored; over the
        ``dense-examples`` series with a lesion target (``lesion-free-examples``
        of them all background), ``segmentation_dice``,
        ``segmentation_hd95`` (mm) and ``anomaly_miou`` (see
        :meth:`fedmri.heads.dense.DenseTaskSpec.metrics`), Dice and mIoU with
        their interval as above. A task with no known label in the split has none.

    Raises:
        RequestError: Weights that do not fit the run's model.
    """
    device = site_device(site_cfg)
    heads = _site_heads(run_cfg, state, device).eval()
    dataset = site_dataset(site_cfg, split)
    out: dict[str, float] = {"heads-examples": len(dataset)}
    if not len(dataset):
        return out
    cached = _cached(site_cfg, run_cfg, state, dataset, device)
    features = _pooled(run_cfg, cached).to(device)  # N, F
    regions = [str(row["meta"]["body_region"]) for row in dataset.rows]
    sequences = [str(row["meta"]["sequence"]) for row in dataset.rows]
    patients = [str(row["meta"]["patient_id"]) for row in dataset.rows]
    out["heads-patients"] = len(set(patients))
    targets = task_targets(list(heads), dataset.rows)
    outputs = task_outputs(heads, features, list(targets))
    for task, (target, known) in targets.items():
        scores = outputs[task].cpu()  # N, out_dim
        spec = TASKS[task]
        scored = spec.metrics(scores, target, known) | spec.region_metrics(scores, target, known, regions)
        scored |= spec.sequence_metrics(scores, target, known, regions, sequences)
        scored |= task_intervals(spec, scores, target, known, regions, patients, seed=int(run_cfg.seed))
        out |= {f"{task}_{k}": v for k, v in scored.items() if math.isfinite(v)}
    lesions, masked = lesion_rows(dataset) if dense_tasks(list(heads)) else ([], set())
    if lesions:
        dense = dense_data(run_cfg, dataset, lesions, masked, cached, device)
        out["dense-examples"] = len(lesions)
        # A head that finds no lesion anywhere scores these (Dice 1) and misses the rest (0): the tables' floor.
        out["lesion-free-examples"] = int((dense.targets.flatten(1).amax(1) == 0).sum())
        out |= dense.metrics(heads, list(run_cfg.data.preprocess.target_spacing), int(site_cfg.batch_size),
                             [patients[i] for i in lesions], seed=int(run_cfg.seed))
    return out
