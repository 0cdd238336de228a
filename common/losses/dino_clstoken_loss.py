"""DINO self-distillation loss on CLS-token prototype logits (Caron et al. 2021).

The teacher's logits become targets by centering (subtract a running mean,
then a sharp softmax) or, optionally, by Sinkhorn-Knopp balancing (SwAV,
DINOv2). The loss is the cross-entropy of each student view against each
teacher view it is paired with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CENTERINGS = ("centering", "sinkhorn_knopp")


def sinkhorn_knopp(logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Soft assignments of rows to columns with (nearly) equal column mass.

    Args:
        logits: (M, K) teacher logits.
        temperature: Softmax temperature.
        n_iterations: Alternating normalisation rounds (DINOv2: 3).

    Returns:
        (M, K) rows that sum to 1, columns balanced across the M rows.
    """
    # Subtracting the global max only rescales Q, which the first normalisation undoes.
    q = torch.exp((logits - logits.max()).float() / temperature).t()  # K, M
    n_prototypes, n_rows = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    return (q * n_rows).t()  # M, K


class DINOClsTokenLoss(nn.Module):
    """Cross-entropy between student views and centred, sharpened teacher views.

    Args:
        out_dim: Number of prototypes K.
        student_temp: Student softmax temperature (DINOv2: 0.1).
        center_momentum: EMA momentum of the teacher centre (DINO: 0.9).
        centering: ``"centering"`` or ``"sinkhorn_knopp"``.

    Raises:
        ValueError: For an unknown ``centering`` or an out-of-range number.
    """

    # The target of sample i depends on sample i and the centre buffer, which
    # is detached and built from earlier batches, so the loss is a sum of
    # per-sample terms (DP-SGD applies). Sinkhorn-Knopp balances targets
    # across the batch and is not; __init__ then overrides this on the instance.
    # The centre itself is a running statistic of the data: privacy work must
    # count it if it leaves the site.
    per_sample_decomposable: bool = True

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        if centering == "sinkhorn_knopp":
            self.per_sample_decomposable = False
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities (M, K) from teacher logits (M, K), per ``centering``."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the batch mean of teacher logits (M, K) into the centre.

        Call after :meth:`teacher_targets`, so a batch is centred with the
        statistics of earlier batches only.
        """
        batch_center = teacher_logits.float().mean(dim=0, keepdim=True)  # 1, K
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> Tensor:
        """Sum over all (student view, teacher view) pairs of the batch-mean cross-entropy.

        Args:
            student_logits: Views of (B, K) student logits.
            teacher_probs: Views of (B, K) teacher targets, row i the same
                sample as row i of each student view.

        Returns:
            Scalar ``-sum_pairs mean_i sum_k t_ik log softmax(s_i / T_s)_k``.
        """
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for s in student_logits:
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)  # B, K
            for t in teacher_probs:
                total = total - (t * log_p).sum(dim=-1).mean()
        return total
