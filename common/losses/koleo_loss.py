"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search").

Pushes each L2-normalised embedding away from its nearest neighbour in the
batch, so the student's CLS embeddings spread over the sphere (DINOv2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` on L2-normalised rows.

    Args:
        eps: Added inside the log so that duplicates give a large finite loss.
    """

    # Each term depends on the sample's nearest neighbour in the batch: the
    # samples are coupled, so per-sample clipping gives no DP guarantee.
    per_sample_decomposable: bool = False

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    @staticmethod
    def nearest_neighbours(x: Tensor) -> Tensor:
        """Index of each row's nearest other row by inner product (rows unit-norm)."""
        dots = x @ x.t()  # B, B
        dots.fill_diagonal_(-2.0)  # below any cosine, so a row never picks itself
        return dots.argmax(dim=1)  # B

    def forward(self, x: Tensor) -> Tensor:
        """Loss for embeddings ``x`` of shape (B, D), B >= 2."""
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeo needs (B, D) embeddings with B >= 2, got {tuple(x.shape)}")
        # fp32 even under autocast: neighbours a few 1e-3 apart are what KoLeo pushes apart,
        # and bf16 rounds at that scale (and would pick the wrong neighbour).
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, eps=self.eps)
            with torch.no_grad():
                nn_idx = self.nearest_neighbours(x)
            distances = F.pairwise_distance(x, x[nn_idx], eps=self.eps)  # B
            return -torch.log(distances + self.eps).mean()
