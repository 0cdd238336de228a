"""Under bf16 autocast every loss computes in fp32: the same value as without autocast, given the same inputs.

The trainers run forward and loss under autocast (``train.precision``); a
loss whose temperature or logit scale amplifies bf16 rounding must not round.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmri.losses import ClipLoss, DINOClsTokenLoss, KoLeoLoss, SigLipLoss, iBOTPatchLoss


def _bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("loss", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_contrastive_logits_and_loss_are_fp32_under_autocast(loss) -> None:
    img, txt, queue = _unit(6, 32, seed=0), _unit(6, 32, seed=1), _unit(4, 32, seed=2)
    scale = torch.tensor(100.0)  # the clamp: the scale at which rounding would hurt most
    args = (img, txt, scale) if isinstance(loss, ClipLoss) else (img, txt, scale, torch.tensor(-10.0))
    expected = loss(*args, text_queue=queue)
    with _bf16_autocast():
        logits = loss.get_logits(*args, text_queue=queue)
        got = loss(*args, text_queue=queue)
    assert (logits[0] if isinstance(logits, tuple) else logits).dtype == torch.float32
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_koleo_picks_the_nearest_neighbour_in_fp32_under_autocast() -> None:
    # Row 0's neighbours sit at cosines 0.9985 (row 1) and 0.9990 (row 2): both round to 1.0
    # in bf16, and argmax would take the first, farther one.
    a, b = math.acos(0.9985), math.acos(0.9990)
    x = torch.tensor([[1.0, 0.0, 0.0], [math.cos(a), math.sin(a), 0.0], [math.cos(b), 0.0, math.sin(b)]])
    expected = KoLeoLoss()(x)
    with _bf16_autocast():
        got = KoLeoLoss()(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_dino_and_ibot_targets_and_losses_are_fp32_for_bf16_logits() -> None:
    s, t = torch.randn(4, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    dino, ibot = DINOClsTokenLoss(16), iBOTPatchLoss(16)
    masks = torch.tensor([[True, False], [True, True], [False, False], [False, True]])
    with _bf16_autocast():
        targets = dino.teacher_targets(t, teacher_temp=0.04)
        assert targets.dtype == torch.float32
        assert dino([s], [targets]).dtype == torch.float32
        assert ibot(s, targets, masks).dtype == torch.float32
        dino.update_center(t)
    assert dino.center.dtype == torch.float32
