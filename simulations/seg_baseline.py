"""Lesion segmentation against the clock: a from-scratch U-Net and decoders on a frozen encoder.

How long does tuning a decoder on a frozen foundation encoder take to reach
the Dice of a network trained from scratch on the same volumes (Decipher-MR,
Yang et al. 2026)? Each model is a :class:`Segmenter`; the models train side
by side, one step each in turn, each on its own clocks (wall seconds, and the
process's CPU seconds, which stay steady when other jobs share the cores), so
a change of load slows them alike while they all run. Each is scored every
``eval_every_s`` seconds of its own training with
:func:`fedmri.metrics.segmentation_metrics`; scoring is not timed.

- :func:`build_unet_baseline`: MONAI's ``UNet``, or ``DynUNet`` laid out like nnU-Net;
- :class:`VolumeSegmenter`: a network from image to voxel logits;
- :class:`TokenSegmenter`: a :class:`fedmri.heads.UNETRDecoder` on tokens that
  :func:`extract_tokens` computed once through the feature cache;
- :func:`train_side_by_side` returns a :class:`SegRun` per model (Dice against
  training seconds); :func:`train_unet_baseline` runs the baseline alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedmri.errors import ConfigError, InputError

BASELINES = ("unet", "dynunet")


@dataclass
class SegSet:
    """Volumes with lesion masks, in memory: ``images`` (N, C, X, Y, Z) float32 and
    ``labels`` (N, 1, X, Y, Z) uint8, 1 where any lesion is; ``ids`` name them stably."""

    ids: list[str]
    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)


def load_seg_set(catalogs: Sequence[str | Path], splits: Sequence[str]) -> SegSet:
    """The series with a lesion mask in ``splits`` of every catalog, lesion classes merged.

    Raises:
        InputError: If none of them has a mask.
    """
    from fedmri.data.dataset import SeriesDataset

    ids, images, labels = [], [], []
    for catalog in catalogs:
        for split in splits:
            dataset = SeriesDataset(catalog, split, masks_only=True)
            for i in range(len(dataset)):
                sample = dataset[i]
                ids.append(f"{catalog}|{sample['meta']['series_id']}")
                images.append(sample["image"])  # C, X, Y, Z
                labels.append((sample["mask"] > 0).to(torch.uint8))  # 1, X, Y, Z
    if not ids:
        raise InputError(f"no series with a lesion mask in splits {list(splits)} of {[str(c) for c in catalogs]}")
    return SegSet(ids, torch.stack(images), torch.stack(labels))


def build_unet_baseline(kind: str = "unet", in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    """A from-scratch 3D segmentation network from MONAI, with instance norm.

    Args:
        kind: ``"unet"``: ``monai.networks.nets.UNet``, channels (16, 32, 64,
            128), strides 2, two residual units per level (MONAI's tutorial
            setting, one level fewer for 64^3 volumes); ``"dynunet"``:
            ``DynUNet`` as nnU-Net plans a 64^3 input (a 3^3 stage at full
            resolution, then four stride-2 stages, 16 to 256 filters), without
            deep supervision. Default ``"unet"``.
        in_channels: Image channels. Default 1.
        out_channels: Classes, background included. Default 2.

    Raises:
        ConfigError: For an unknown ``kind``.
    """
    from monai.networks.nets import DynUNet, UNet

    if kind == "unet":
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                    channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="instance")
    if kind == "dynunet":
        return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, kernel_size=[3] * 5,
                       strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4, filters=[16, 32, 64, 128, 256],
                       norm_name="instance", res_block=True)
    raise ConfigError(f"baseline {kind!r} is not one of {', '.join(BASELINES)}")


class Segmenter:
    """A trainable module scored as a segmenter: Dice + cross-entropy, AdamW, argmax labels.

    Subclasses say how the module turns items of the training or evaluation
    set into voxel logits (:meth:`logits`).
    """

    def __init__(self, name: str, module: nn.Module, train: SegSet, evaluation: SegSet, *, lr: float,
                 weight_decay: float) -> None:
        from monai.losses import DiceCELoss

        if lr <= 0 or weight_decay < 0:
            raise ConfigError(f"{name}: need lr > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
        self.name, self.module, self.train, self.evaluation = name, module.train(), train, evaluation
        # UNETRDecoder.loss, so that every model optimises the same objective.
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)

    def logits(self, training: bool, index: Tensor) -> Tensor:
        """Voxel logits (n, K, X, Y, Z) of items ``index`` of the training or evaluation set."""
        raise NotImplementedError

    def step(self, index: Tensor) -> float:
        """One optimisation step on training items ``index``; returns the loss."""
        loss = self.loss(self.logits(True, index), self.train.labels[index].long())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, index: Tensor) -> Tensor:
        """Label maps (n, 1, X, Y, Z) of evaluation items ``index``."""
        self.module.eval()
        try:
            return self.logits(False, index).argmax(1, keepdim=True)
        finally:
            self.module.train()

    def step_gflop(self, index: Tensor) -> float:
        """GFLOP of one forward and backward pass (no update), counted by ``torch.utils.flop_counter``."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.loss(self.logits(True, index), self.train.labels[index].long()).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 1e9


class VolumeSegmenter(Segmenter):
    """A network from image (B, C, X, Y, Z) to voxel logits, e.g. :func:`build_unet_baseline`."""

    def __init__(self, name: str, net: nn.Module, train: SegSet, evaluation: SegSet, *, lr: float,
                 weight_decay: float = 1e-5) -> None:
        super().__init__(name, net, train, evaluation, lr=lr, weight_decay=weight_decay)

    def logits(self, training: bool, index: Tensor) -> Tensor:
        return self.module((self.train if training else self.evaluation).images[index])


@dataclass
class Tokens:
    """A frozen encoder's tokens of a :class:`SegSet`, in its order: what the UNETR decoder reads."""

    layers: list[Tensor]
    patch: Tensor
    grid: tuple[int, int, int]


def extract_tokens(cfg: Any, encoder: nn.Module, sets: Sequence[SegSet], root: str | Path,
                   layers: Sequence[int]) -> tuple[list[Tokens], list[float]]:
    """Put every volume through the encoder once, through :class:`fedmri.heads.FeatureCache`.

    Returns:
        The tokens of each set, and the seconds each set took (encoding and
        writing the cache entries, when ``root`` starts empty).
    """
    from fedmri.heads.features import build_feature_cache

    cache = build_feature_cache(cfg, encoder, layers=layers, patch_tokens=True, root=root)
    out, seconds = [], []
    for volumes in sets:
        position = {item_id: i for i, item_id in enumerate(volumes.ids)}
        start = time.perf_counter()
        cached = cache.get(volumes.ids, lambda item_id: volumes.images[position[item_id]])
        seconds.append(time.perf_counter() - start)
        assert cached.patch is not None, "the cache was asked for patch tokens"
        out.append(Tokens(cached.layers, cached.patch, cached.grid))
    return out, seconds


class TokenSegmenter(Segmenter):
    """A :class:`fedmri.heads.UNETRDecoder` on cached tokens (and the image, if it has the skip)."""

    def __init__(self, name: str, head: nn.Module, train: SegSet, train_tokens: Tokens, evaluation: SegSet,
                 eval_tokens: Tokens, *, lr: float, weight_decay: float = 1e-4) -> None:
        super().__init__(name, head, train, evaluation, lr=lr, weight_decay=weight_decay)
        self.tokens = {True: train_tokens, False: eval_tokens}

    def logits(self, training: bool, index: Tensor) -> Tensor:
        tokens = self.tokens[training]
        image = (self.train if training else self.evaluation).images[index] if self.module.image_skip else None
        return self.module([t[index] for t in tokens.layers], tokens.patch[index], tokens.grid, image)


@dataclass
class CurvePoint:
    """One scoring: Dice and HD95 (mm; None when undefined everywhere) after ``train_s`` wall seconds
    (``train_cpu_s`` CPU seconds of the process, all threads) of training."""

    step: int
    train_s: float
    train_cpu_s: float
    dice: float
    hd95: float | None
    hd95_undefined: int


@dataclass
class SegRun:
    """A model's scores against its own training seconds (``curve[0]`` is before any step),
    the wall and CPU seconds of each step, the wall seconds of each scoring (not in ``train_s``),
    and why it stopped."""

    name: str
    curve: list[CurvePoint] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    score_s: list[float] = field(default_factory=list)
    stopped: str = ""  # "budget" or "plateau"

    @property
    def best(self) -> CurvePoint:
        """The earliest point of the highest Dice."""
        return max(self.curve, key=lambda p: (p.dice, -p.train_s))

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")

    def first_reaching(self, dice: float) -> CurvePoint | None:
        """The first point with Dice >= ``dice``; None if the run never got there."""
        return next((p for p in self.curve if p.dice >= dice), None)


def score(model: Segmenter, evaluation: SegSet, spacing: float | Sequence[float] | None,
          batch_size: int = 4) -> dict[str, float]:
    """:func:`fedmri.metrics.segmentation_metrics` of ``model`` over every evaluation volume."""
    from fedmri.metrics import segmentation_metrics

    n = len(evaluation)
    pred = torch.cat([model.predict(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])
    return segmentation_metrics(pred.numpy(), evaluation.labels.numpy(), spacing=spacing)


def _batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:  # epochs of fresh permutations; a last partial batch is dropped
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i: i + batch_size]


def _stalled(curve: Sequence[CurvePoint], min_gain: float) -> int:
    """Scorings since Dice last rose ``min_gain`` above its record; 0 until it first rose above the untrained Dice.

    Models often sit at Dice 0 for a while (all background) before they find
    the lesions: that is not a plateau.
    """
    record, last = curve[0].dice, 0
    for i, p in enumerate(curve):
        if p.dice >= record + min_gain:
            record, last = p.dice, i
    return len(curve) - 1 - last if last > 0 else 0


def train_side_by_side(models: Sequence[Segmenter], *, budget_s: float, eval_every_s: float, patience: int,
                       batch_size: int, seed: int, spacing: float | Sequence[float] | None = None,
                       min_gain: float = 0.005, say: Callable[[str], None] = print) -> dict[str, SegRun]:
    """Train ``models`` one step each in turn until each runs out of budget or stops improving.

    Every model draws the same batches, in the same order, from its training
    set (the sets must be equally long). A model is scored after every
    ``eval_every_s`` seconds of its own steps, or after as many seconds as its
    last scoring took if that is longer (so scoring at most doubles its wall
    time), and at the end. It stops after ``budget_s`` seconds of steps, or
    once ``patience`` scorings in a row have not raised its best Dice by ``min_gain``.

    Args:
        models: The models (distinct names).
        budget_s: Most seconds of training steps per model.
        eval_every_s: Seconds of a model's training between its scorings, at least.
        patience: Scorings without gain before a model stops.
        batch_size: Items per step.
        seed: Seeds the batch order.
        spacing: Voxel size in mm, for HD95.
        min_gain: The Dice gain that counts as one.
        say: Progress lines.

    Raises:
        ConfigError: For no models, non-positive settings, repeated names or training sets of different lengths.
    """
    sizes = {len(m.train) for m in models}
    if len(sizes) != 1 or min(budget_s, eval_every_s, patience, batch_size) <= 0 or batch_size > min(sizes):
        raise ConfigError(f"need models with one training-set size (got {sorted(sizes)}), budget_s, eval_every_s, "
                          f"patience > 0 and 0 < batch_size <= it; got {budget_s}, {eval_every_s}, {patience}, "
                          f"{batch_size}")
    if len({m.name for m in models}) != len(models):
        raise ConfigError(f"model names must differ: {[m.name for m in models]}")
    runs = {m.name: SegRun(m.name) for m in models}
    draws = {m.name: _batches(len(m.train), batch_size, seed) for m in models}

    def evaluate(m: Segmenter) -> None:
        run, start = runs[m.name], time.perf_counter()
        metrics = score(m, m.evaluation, spacing)
        run.score_s.append(time.perf_counter() - start)
        point = CurvePoint(len(run.step_s), sum(run.step_s), sum(run.step_cpu_s), metrics["dice"],
                           metrics.get("hd95"), int(metrics["hd95_undefined"]))
        run.curve.append(point)
        say(f"  {m.name:38} step {point.step:5d} {point.train_s:7.1f} s  Dice {point.dice:.3f}  "
            f"(scored in {run.score_s[-1]:.1f} s)")

    for m in models:
        evaluate(m)
    active = list(models)
    while active:
        for m in list(active):
            run = runs[m.name]
            start, start_cpu = time.perf_counter(), time.process_time()
            m.step(next(draws[m.name]))
            run.step_s.append(time.perf_counter() - start)
            # CPU time barely moves when other jobs share the cores; wall time can double.
            run.step_cpu_s.append(time.process_time() - start_cpu)
            spent = sum(run.step_s)
            # A scoring as slow as eval_every_s of training would double the model's wall time: space them out.
            if spent >= min(run.curve[-1].train_s + max(eval_every_s, run.score_s[-1]), budget_s):
                evaluate(m)
                if spent >= budget_s or _stalled(run.curve, min_gain) >= patience:
                    run.stopped = "budget" if spent >= budget_s else "plateau"
                    active.remove(m)
    return runs


def train_unet_baseline(train: SegSet, evaluation: SegSet, *, kind: str = "unet", lr: float = 1e-3,
                        seed: int = 0, **kwargs: Any) -> SegRun:
    """Train :func:`build_unet_baseline` from scratch alone; ``kwargs`` go to :func:`train_side_by_side`."""
    torch.manual_seed(seed)
    model = VolumeSegmenter(f"{kind} from scratch", build_unet_baseline(kind, train.images.shape[1]), train,
                            evaluation, lr=lr)
    return train_side_by_side([model], seed=seed, **kwargs)[model.name]
