"""The dense tasks of the ``heads`` stage: lesion segmentation and anomaly localisation.

Both predict the lesion mask of a series (``SeriesDataset`` samples' ``"mask"``:
0 = background, any other label = lesion) as a 0/1 voxel map, from the frozen
encoder's cached tokens:

- ``segmentation``: :class:`~fedmri.heads.UNETRDecoder` on three intermediate
  layers and the patch tokens (and the image with ``heads.seg_image_skip``),
  two classes (background, lesion), Dice + cross-entropy; metrics ``dice`` and
  ``hd95`` (mm) of the argmax mask (:func:`fedmri.metrics.segmentation_metrics`);
- ``anomaly``: :class:`~fedmri.heads.AnomalyHead`, a logit per patch token
  upsampled to the voxels, voxel BCE; metric ``miou`` of the probability map
  thresholded at 0.5 (:func:`fedmri.metrics.mean_iou`).

Which series have a target (:func:`lesion_target`):

- a series with a mask: the mask;
- a series whose labels row lists no finding (labels.csv: empty = no finding,
  the contract the ``findings`` head already trains its negatives on): all
  background. Without these negatives the heads would only ever see lesions
  and learn to find one in every scan;
- any other series is *unknown* and trains neither head: one that lists a
  finding but has no mask (not annotated, or the lesion is outside this
  series), and one without a labels row.

Both losses are means of per-series terms, so the tasks train under
per-series DP-SGD like the MLP heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.metrics import dice_per_sample, iou_per_sample, mean_iou, segmentation_metrics


@dataclass
class DenseInputs:
    """What the dense heads read for a batch of series: cached tokens (and images).

    Attributes:
        layers: Three intermediate token maps, each (B, N, D), shallow to deep.
        patch: Final patch tokens (B, N, D).
        grid: Patch grid (gx, gy, gz).
        image: The volumes (B, C, X, Y, Z) for the decoder's image skip, else None.
    """

    layers: list[Tensor]
    patch: Tensor
    grid: tuple[int, int, int]
    image: Tensor | None = None

    def take(self, idx: Tensor) -> DenseInputs:
        """The rows ``idx`` (on the tensors' device)."""
        return DenseInputs([t[idx] for t in self.layers], self.patch[idx], self.grid,
                           None if self.image is None else self.image[idx])

    def to(self, device: torch.device | str) -> DenseInputs:
        """The same inputs on ``device``."""
        return DenseInputs([t.to(device) for t in self.layers], self.patch.to(device), self.grid,
                           None if self.image is None else self.image.to(device))


def no_finding(item: Mapping[str, Any]) -> bool:
    """Whether a catalog row or sample has a labels row that lists no finding (its lesion map is all background)."""
    codes = torch.as_tensor((item["labels"] if "labels" in item else item)["findings"])  # L; -1 = no labels row
    return bool((codes == 0).all())


def lesion_target(item: Mapping[str, Any], shape: Sequence[int]) -> tuple[Tensor, bool]:
    """The 0/1 lesion map (1, X, Y, Z) uint8 of a sample, and whether it is known.

    Args:
        item: A ``SeriesDataset`` sample (``"mask"`` when the series has one, and ``"labels"``).
        shape: The voxel grid (X, Y, Z), for the all-background map of a series with no finding.

    Returns:
        The mask's lesion voxels (any label > 0); all background for a series with
        no finding and no mask; zeros and ``False`` (unknown) otherwise.
    """
    mask = item.get("mask")
    if mask is not None:
        return (torch.as_tensor(mask) > 0).to(torch.uint8), True
    return torch.zeros(1, *shape, dtype=torch.uint8), no_finding(item)


def reads_image(cfg: Any) -> bool:
    """Whether the segmentation head of ``cfg.heads`` reads the image (light decoder, or UNETR with the skip)."""
    return cfg.heads.seg_decoder == "light" or bool(cfg.heads.seg_image_skip)


@dataclass(frozen=True)
class DenseTaskSpec:
    """One dense task: its head, its per-series loss, its predicted mask and metrics.

    Attributes:
        name: The task name (``heads.tasks`` entry, wire group ``head.<name>``).
        kind: ``"segmentation"`` or ``"anomaly"``.
        classes: Background and lesion: the decoder's output channels.
    """

    name: str
    kind: str
    classes: tuple[str, ...] = ("background", "lesion")

    def build(self, cfg: Any) -> nn.Module:
        """The head for the run config ``cfg`` (``model`` and ``heads`` sections)."""
        if self.kind == "segmentation":
            from fedmri.heads.segmentation import build_segmentation_head  # MONAI: slow import

            return build_segmentation_head(cfg, len(self.classes))
        from fedmri.heads.anomaly import build_anomaly_head

        return build_anomaly_head(cfg)

    def logits(self, head: nn.Module, inputs: DenseInputs, shape: Sequence[int]) -> Tensor:
        """Voxel logits: (B, 2, X, Y, Z) for segmentation, (B, 1, X, Y, Z) for anomaly, on grid ``shape``."""
        if self.kind == "segmentation":
            return head(inputs.layers, inputs.patch, inputs.grid, inputs.image)
        return head.logits(inputs.patch, inputs.grid, shape)

    def sample_losses(self, head: nn.Module, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of each series (B,) against 0/1 targets (B, 1, X, Y, Z).

        Segmentation: the decoder's Dice + cross-entropy of that series alone
        (its batch mean is a mean of these); anomaly: mean voxel BCE.
        """
        if self.kind == "segmentation":
            target = target.long()
            return torch.stack([head.loss(logits[i:i + 1], target[i:i + 1]) for i in range(logits.shape[0])])
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        return bce.flatten(1).mean(1)  # B

    def predict(self, logits: Tensor) -> Tensor:
        """The predicted lesion mask (B, 1, X, Y, Z) bool: argmax, or probability > 0.5 (logit > 0)."""
        if self.kind == "segmentation":
            # The argmax of two classes, ties to background as argmax breaks them; argmax over the
            # channel axis is ~50x slower on a CPU (5 of the 25 s of scoring 150 series at 64^3).
            return logits[:, 1:2] > logits[:, 0:1]
        return logits > 0

    def metrics(self, pred: Tensor, target: Tensor, spacing: Sequence[float] | None = None) -> dict[str, float]:
        """Metrics of predicted against target masks (N, 1, X, Y, Z), unprefixed; {} for N = 0.

        Returns:
            Segmentation: ``dice`` and ``hd95`` (in ``spacing`` units; left out
            when no series has it defined); anomaly: ``miou``.
        """
        if pred.shape[0] == 0:
            return {}
        if self.kind == "segmentation":
            scores = segmentation_metrics(pred, target, spacing=spacing)
            return {k: scores[k] for k in ("dice", "hd95") if k in scores}
        return {"miou": mean_iou(pred, target)}

    def series_scores(self, pred: Tensor, target: Tensor) -> dict[str, np.ndarray]:
        """Each series' score (N,) of the headline metric, whose mean :meth:`metrics` reports, unprefixed.

        Segmentation: ``dice``; anomaly: ``miou`` (each series' IoU). A bootstrap
        over patients resamples these (:func:`fedmri.heads.intervals.series_mean_intervals`).
        HD95 has none: it is a mean over the series where it is defined.
        """
        if pred.shape[0] == 0:
            return {}
        if self.kind == "segmentation":
            return {"dice": dice_per_sample(pred, target)}
        return {"miou": iou_per_sample(pred, target)}


DENSE_TASKS: dict[str, DenseTaskSpec] = {
    "segmentation": DenseTaskSpec("segmentation", "segmentation"),
    "anomaly": DenseTaskSpec("anomaly", "anomaly"),
}


def dense_tasks(tasks: Sequence[str]) -> list[str]:
    """The dense tasks among ``tasks``, in order."""
    return [str(t) for t in tasks if str(t) in DENSE_TASKS]
