"""Anomaly localisation: a score per patch token, upsampled to a voxel map.

Each patch token gets a logit; the logit grid is resized trilinearly to the
voxel grid and passed through a sigmoid. Interpolating logits rather than
probabilities keeps the map smooth where neighbouring patches disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.errors import ConfigError


class AnomalyHead(nn.Module):
    """Per-patch anomaly scorer on patch tokens.

    Args:
        embed_dim: Token width D.
        hidden_dim: Hidden width of the scorer; 0 = one linear layer. Default 0.

    Raises:
        ConfigError: For a non-positive width.
    """

    # The voxel BCE is a mean over voxels of per-sample maps.
    per_sample_decomposable = True

    def __init__(self, embed_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        if embed_dim < 1 or hidden_dim < 0:
            raise ConfigError(f"anomaly head sizes must be positive: embed_dim={embed_dim}, hidden_dim={hidden_dim}")
        layers: list[nn.Module] = [nn.LayerNorm(embed_dim)]
        if hidden_dim:
            layers += [nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1)]
        else:
            layers.append(nn.Linear(embed_dim, 1))
        self.scorer = nn.Sequential(*layers)

    def patch_logits(self, patch: Tensor, grid: Sequence[int]) -> Tensor:
        """Logit per patch (B, 1, gx, gy, gz) from tokens (B, N, D), x-major."""
        b, n, _ = patch.shape
        if n != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{n} tokens do not fill the patch grid {tuple(grid)}")
        scores = self.scorer(patch.to(self.scorer[0].weight.dtype))  # B, N, 1
        return scores.reshape(b, 1, *grid)  # B, 1, gx, gy, gz

    def logits(self, patch: Tensor, grid: Sequence[int], out_shape: Sequence[int]) -> Tensor:
        """Voxel logits (B, 1, X, Y, Z): patch logits resized trilinearly to ``out_shape``."""
        return F.interpolate(self.patch_logits(patch, grid), size=tuple(out_shape), mode="trilinear",
                             align_corners=False)  # B, 1, X, Y, Z

    def forward(self, patch: Tensor, grid: Sequence[int], out_shape: Sequence[int]) -> Tensor:
        """Voxel anomaly probabilities (B, 1, X, Y, Z) in [0, 1]."""
        return self.logits(patch, grid, out_shape).sigmoid()

    def loss(self, patch: Tensor, grid: Sequence[int], mask: Tensor) -> Tensor:
        """Voxel-wise binary cross-entropy against a 0/1 anomaly mask (B, 1, X, Y, Z)."""
        logits = self.logits(patch, grid, mask.shape[2:])
        return F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype))


def build_anomaly_head(cfg: Any) -> AnomalyHead:
    """An :class:`AnomalyHead` for ``cfg.model.embed_dim`` with ``heads.anomaly_hidden_dim``."""
    return AnomalyHead(cfg.model.embed_dim, cfg.heads.anomaly_hidden_dim)
