"""The segmentation benchmark's machinery: side-by-side training, plateaus, the from-scratch baseline."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fedmri.errors import ConfigError
from fedmri.simulations.seg_baseline import (
    CurvePoint,
    SegRun,
    SegSet,
    VolumeSegmenter,
    _stalled,
    build_unet_baseline,
    train_side_by_side,
    train_unet_baseline,
)


def _cubes(n: int, seed: int, size: int = 16) -> SegSet:
    """Noisy volumes, each with one bright cube as its lesion: easy to segment, impossible to fake."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 1, size, size, size, generator=g)
    labels = torch.zeros(n, 1, size, size, size, dtype=torch.uint8)
    for i in range(n):
        x, y, z = torch.randint(1, size - 6, (3,), generator=g).tolist()
        labels[i, 0, x:x + 5, y:y + 5, z:z + 5] = 1
    images += 2.0 * labels
    return SegSet([f"v{i}" for i in range(n)], images, labels)


def _point(step: int, dice: float) -> CurvePoint:
    return CurvePoint(step, float(step), float(step), dice, None, 0)


def test_stalled_counts_scorings_since_the_last_gain_but_not_an_initial_zero() -> None:
    assert _stalled([_point(i, 0.0) for i in range(6)], 0.005) == 0  # all background so far: not a plateau
    curve = [_point(0, 0.0), _point(1, 0.0), _point(2, 0.3), _point(3, 0.302), _point(4, 0.31), _point(5, 0.312)]
    assert _stalled(curve, 0.005) == 1  # 0.31 was the last gain of 0.005 over the record
    assert _stalled(curve, 0.5) == 0  # never rose enough to count


def test_segrun_best_is_the_earliest_top_and_first_reaching_the_first_at_target() -> None:
    run = SegRun("m", curve=[_point(0, 0.0), _point(1, 0.4), _point(2, 0.6), _point(3, 0.6), _point(4, 0.5)])
    assert run.best.step == 2
    assert run.first_reaching(0.45).step == 2
    assert run.first_reaching(0.61) is None


class _Recorder(VolumeSegmenter):
    """A volume segmenter that keeps the batches it was handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def step(self, index: Tensor) -> float:
        self.seen.append(index.tolist())
        return super().step(index)


def test_models_train_side_by_side_on_the_same_batches_and_stop_at_their_budget() -> None:
    train, evaluation = _cubes(6, 0), _cubes(2, 1)
    models = [_Recorder(name, nn.Conv3d(1, 2, 3, padding=1), train, evaluation, lr=1e-2) for name in ("a", "b")]
    lines: list[str] = []
    runs = train_side_by_side(models, budget_s=0.5, eval_every_s=0.2, patience=100, batch_size=2, seed=3,
                              say=lines.append)
    a, b = models
    assert a.seen and a.seen[: len(b.seen)] == b.seen[: len(a.seen)]
    assert all(len(batch) == 2 for batch in a.seen)
    for run in runs.values():
        assert run.stopped == "budget" and sum(run.step_s) >= 0.5
        assert run.curve[0].step == 0 and run.curve[-1].step == len(run.step_s)
        assert len(run.step_cpu_s) == len(run.step_s) and len(run.score_s) == len(run.curve)
    assert any(line.strip().startswith("a ") for line in lines)


@pytest.mark.slow
def test_the_from_scratch_unet_learns_an_easy_lesion() -> None:
    torch.manual_seed(0)
    train, evaluation = _cubes(8, 0), _cubes(4, 1)
    # Stops once a scoring gains under 0.05 Dice; the budget only bounds a machine too loaded to get there.
    run = train_unet_baseline(train, evaluation, lr=3e-3, budget_s=120, eval_every_s=3, patience=1, min_gain=0.05,
                              batch_size=2, say=lambda _: None)
    assert run.curve[0].dice < 0.3
    assert run.best.dice > 0.6, [round(p.dice, 3) for p in run.curve]


def test_bad_settings_are_refused_with_what_was_given() -> None:
    train = _cubes(4, 0)
    one = VolumeSegmenter("m", nn.Conv3d(1, 2, 1), train, train, lr=1e-3)
    other = VolumeSegmenter("n", nn.Conv3d(1, 2, 1), _cubes(3, 1), train, lr=1e-3)
    with pytest.raises(ConfigError, match="one training-set size"):
        train_side_by_side([one, other], budget_s=1, eval_every_s=1, patience=1, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        train_side_by_side([one], budget_s=1, eval_every_s=1, patience=1, batch_size=5, seed=0)
    with pytest.raises(ConfigError, match="names must differ"):
        train_side_by_side([one, VolumeSegmenter("m", nn.Conv3d(1, 2, 1), train, train, lr=1e-3)],
                           budget_s=1, eval_every_s=1, patience=1, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="lr > 0"):
        VolumeSegmenter("m", nn.Conv3d(1, 2, 1), train, train, lr=0.0)
    with pytest.raises(ConfigError, match="not one of unet, dynunet"):
        build_unet_baseline("nnunet")
