"""The dense tasks (``segmentation``, ``anomaly``) in the ``heads`` stage at a site.

They train on the series with a lesion target (a mask, or all background for
a series whose labels list no finding; others are unknown, see
:mod:`fedmri.heads.dense`), from the patch tokens and intermediate layers that
the feature cache stores only when a dense task is asked, so an MLP-only run
caches and reads what it always did.

A step's dense loss is each task's mean over the batch's series with a target;
under DP-SGD each series' term is its MLP losses plus its dense losses, clipped
per series like the MLP terms (both dense losses are per-series means).

Cost: the UNETR decoder dominates a round, and only batches holding a series
with a target run it. Measured at the tiny preset (64^3 volumes) on synthetic
site-01 (11 train series, all with a target), 20 local steps of batch 4 on one
thread, CPU seconds per round: MLP heads alone 0.3-0.5; with segmentation and
anomaly 71 (``seg_feature_size`` 16; 23 at 8), 98 under DP-SGD; with the
full-resolution image skip (``heads.seg_image_skip``: convolutions on the 64^3
grid, and every volume reloaded each round) 187, so the skip is off by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedmri.heads.dense import (DENSE_TASKS, DenseInputs, DenseTaskSpec, dense_tasks, lesion_target, no_finding,
                                reads_image)


def cache_options(run_cfg: Any) -> dict[str, Any]:
    """Extra :func:`~fedmri.heads.build_feature_cache` arguments for the run's dense tasks; {} without any.

    Both dense tasks read the patch tokens; segmentation also the decoder's skip layers.
    """
    tasks = dense_tasks(run_cfg.heads.tasks)
    if not tasks:
        return {}
    if "segmentation" not in tasks:
        return {"patch_tokens": True}
    from fedmri.heads.segmentation import skip_layers

    return {"layers": skip_layers(run_cfg), "patch_tokens": True}


def lesion_rows(dataset: Any) -> tuple[list[int], set[int]]:
    """The series of ``dataset`` (a site's split, maybe pooled) with a lesion target, from its catalog rows.

    Returns:
        Their positions, ascending, and the subset that has a mask (the others
        list no finding: all background).
    """
    masked = {i for i, row in enumerate(dataset.rows) if row["has_mask"]}
    return [i for i, row in enumerate(dataset.rows) if i in masked or no_finding(row)], masked


class _Logits(nn.Module):
    # spec.logits as a forward, so torch.func.functional_call can swap the head's weights.
    def __init__(self, spec: DenseTaskSpec, head: nn.Module) -> None:
        super().__init__()
        self.spec, self.head = spec, head

    def forward(self, inputs: DenseInputs, shape: Sequence[int]) -> Tensor:
        return self.spec.logits(self.head, inputs, shape)


@dataclass
class DenseData:
    """The dense tasks' inputs and 0/1 lesion targets for the series of a split that have one.

    Attributes:
        tasks: The dense tasks asked (``segmentation``, ``anomaly``).
        slot: (N,) long: each series' row in ``inputs`` / ``targets``; -1 = no target (unknown).
        inputs: Cached tokens (and images) of those M series.
        targets: (M, 1, X, Y, Z) uint8 lesion maps.
    """

    tasks: list[str]
    slot: Tensor
    inputs: DenseInputs
    targets: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The voxel grid (X, Y, Z) the heads predict on."""
        return tuple(self.targets.shape[2:])

    def losses(self, heads: nn.ModuleDict, idx: Tensor) -> dict[str, Tensor]:
        """Each task's mean loss over the series of ``idx`` with a target, keyed ``loss_<task>``; {} if none has one."""
        rows = self.slot[idx]
        rows = rows[rows >= 0]
        if not len(rows):
            return {}
        inputs, target = self.inputs.take(rows), self.targets[rows]
        out = {}
        for task in self.tasks:
            spec = DENSE_TASKS[task]
            logits = spec.logits(heads[task], inputs, self.shape)
            out[f"loss_{task}"] = spec.sample_losses(heads[task], logits, target).mean()
        return out

    def series_loss(self, heads: nn.ModuleDict, mlp_loss: Any, seen: list[dict[str, float]]) -> Any:
        """``loss(params, (mlp_sample, slot))``: one series' MLP term plus, with a target, its dense losses.

        ``mlp_loss`` is :func:`fedmri.client.trainers.heads.series_loss`'s; each
        call with a target appends that series' dense loss values to ``seen`` (the
        round's metrics, without a second decoder pass). The term reads that
        series only, so per-series clipping bounds its whole influence.
        """
        from torch.func import functional_call

        wrapped = {task: _Logits(DENSE_TASKS[task], heads[task]) for task in self.tasks}

        def loss(params: dict[str, Tensor], sample: tuple[Any, int]) -> Tensor:
            mlp_sample, slot = sample
            total = mlp_loss(params, mlp_sample)
            if slot < 0:
                return total
            rows = torch.tensor([slot], device=self.targets.device)
            inputs, target = self.inputs.take(rows), self.targets[rows]
            values = {}
            for task, module in wrapped.items():
                own = {f"head.{k[len(task) + 1:]}": v for k, v in params.items() if k.startswith(f"{task}.")}
                logits = functional_call(module, own, (inputs, self.shape))
                term = DENSE_TASKS[task].sample_losses(module.head, logits, target)[0]
                values[f"loss_{task}"] = float(term.detach())
                total = total + term
            seen.append(values)
            return total

        return loss

    @torch.no_grad()
    def metrics(self, heads: nn.ModuleDict, spacing: Sequence[float], batch_size: int,
                patients: Sequence[str] | None = None, seed: int = 0) -> dict[str, float]:
        """``<task>_<metric>`` of every dense task over the series with a target (undefined ones left out).

        Args:
            heads: The run's heads (the dense ones are read).
            spacing: Voxel size in mm (for HD95).
            batch_size: Series per decoder pass.
            patients: The patient of each series with a target (in ``slot`` order); with them,
                the headline figures (:data:`fedmri.heads.intervals.HEADLINE`: Dice, mIoU) get
                their 95% interval over resamples of the patients, ``<task>_<metric>_ci_low`` / ``_ci_high``.
            seed: Resampling seed.
        """
        from fedmri.heads.intervals import series_mean_intervals

        m = self.targets.shape[0]
        targets = self.targets.cpu()
        out: dict[str, float] = {}
        for task in self.tasks:
            spec = DENSE_TASKS[task]
            preds = []
            for start in range(0, m, batch_size):
                rows = torch.arange(start, min(m, start + batch_size), device=self.targets.device)
                preds.append(spec.predict(spec.logits(heads[task], self.inputs.take(rows), self.shape)).cpu())
            pred = torch.cat(preds)
            scores = spec.metrics(pred, targets, spacing)
            if patients is not None:
                scores |= series_mean_intervals(spec.series_scores(pred, targets), patients, seed=seed)
            out |= {f"{task}_{k}": v for k, v in scores.items() if math.isfinite(v)}
        return out


def dense_data(run_cfg: Any, dataset: Any, rows: Sequence[int], masked: set[int], cached: Any,
               device: torch.device) -> DenseData:
    """The dense inputs and lesion targets of the series ``rows`` of ``dataset``.

    Args:
        run_cfg: The run config (``heads.tasks``, ``heads.seg_image_skip``, ``data.preprocess.target_shape``).
        dataset: The split; the samples of ``masked`` give the masks (and all of ``rows`` the images for the skip).
        rows, masked: :func:`lesion_rows` of ``dataset``; ``rows`` not empty.
        cached: The split's :class:`~fedmri.heads.CachedFeatures`, stored with :func:`cache_options`.
        device: Where the heads train.
    """
    tasks = dense_tasks(run_cfg.heads.tasks)
    image_skip = "segmentation" in tasks and reads_image(run_cfg)
    shape = tuple(int(s) for s in run_cfg.data.preprocess.target_shape)
    items = [dataset[i] if i in masked or image_skip else dataset.rows[i] for i in rows]
    targets = []
    for item in items:
        target, known = lesion_target(item, shape)
        assert known, "lesion_rows gave a series without a lesion target"
        targets.append(target)
    index = torch.tensor(list(rows), dtype=torch.long)
    slot = torch.full((len(dataset),), -1, dtype=torch.long)
    slot[index] = torch.arange(len(rows))
    inputs = DenseInputs([t[index] for t in cached.layers], cached.patch[index], cached.grid,
                         torch.stack([item["image"] for item in items]) if image_skip else None)
    return DenseData(tasks, slot.to(device), inputs.to(device), torch.stack(targets).to(device))
