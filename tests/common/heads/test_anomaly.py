"""Anomaly localisation head: token order, voxel map, learning, DP checks."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedmri.errors import ConfigError
from fedmri.heads import AnomalyHead, build_anomaly_head


def test_voxel_map_shape_and_range(encoder) -> None:
    with torch.no_grad():
        out = encoder(torch.rand(2, 1, 32, 32, 32))
    probs = AnomalyHead(48, 8)(out["patch"], out["grid"], (32, 32, 32))
    assert probs.shape == (2, 1, 32, 32, 32)
    assert probs.min() >= 0 and probs.max() <= 1


def test_patch_scores_follow_the_encoder_token_order() -> None:
    # ViT3D flattens the patch grid x-major: token k is (k // (gy*gz), k // gz % gy, k % gz).
    head = AnomalyHead(4)
    with torch.no_grad():
        head.scorer[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        head.scorer[1].bias.zero_()
    grid = (2, 3, 4)
    patch = torch.zeros(1, 24, 4)
    patch[0, 1 * 12 + 2 * 4 + 3] = torch.tensor([5.0, -5.0, 0, 0])  # token of grid cell (1, 2, 3)
    scores = head.patch_logits(patch, grid)  # 1, 1, 2, 3, 4
    assert (scores[0, 0] == scores.max()).nonzero().tolist() == [[1, 2, 3]]


def test_head_learns_to_localise_marked_patches() -> None:
    torch.manual_seed(0)
    grid, n = (4, 4, 4), 64
    patch = torch.randn(8, n, 16)  # B, N, D
    anomalous = torch.zeros(8, *grid, dtype=torch.bool)  # one 2x2x2 block of patches per volume
    for b, (x, y, z) in enumerate(torch.randint(0, 3, (8, 3)).tolist()):
        anomalous[b, x:x + 2, y:y + 2, z:z + 2] = True
    anomalous = anomalous.reshape(8, n)  # B, N, x-major like the encoder's tokens
    patch[..., 0] += 3 * anomalous
    mask = anomalous.float().reshape(8, 1, *grid)
    mask = torch.nn.functional.interpolate(mask, scale_factor=4, mode="nearest")  # B, 1, 16, 16, 16
    head = AnomalyHead(16)

    def voxel_iou() -> float:
        with torch.no_grad():
            predicted = head(patch, grid, (16, 16, 16)) > 0.5
        return float((predicted & (mask > 0)).sum() / (predicted | (mask > 0)).sum().clamp_min(1))

    untrained = voxel_iou()
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        loss = head.loss(patch, grid, mask)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    # About 0.6 here: trilinear upsampling blurs block edges, so the voxel IoU
    # stays below the patch-level one.
    assert voxel_iou() > max(0.45, untrained + 0.2)


def test_head_passes_the_opacus_validator(cfg) -> None:
    head = build_anomaly_head(cfg)
    assert ModuleValidator.validate(head, strict=False) == []
    assert ModuleValidator.validate(AnomalyHead(16, 8), strict=False) == []


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        AnomalyHead(0)
    with pytest.raises(ValueError, match="patch grid"):
        AnomalyHead(4).patch_logits(torch.zeros(1, 5, 4), (2, 2, 2))
