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
from torch import Tensor

from fedmri.losses.teacher_targets import CENTERINGS, CenteredTeacherLoss, sinkhorn_knopp

__all__ = ["CENTERINGS", "DINOClsTokenLoss", "sinkhorn_knopp"]


class DINOClsTokenLoss(CenteredTeacherLoss):
    """Cross-entropy between student views and centred, sharpened teacher views.

    Args:
        out_dim: Number of prototypes K.
        student_temp: Student softmax temperature (DINOv2: 0.1).
        center_momentum: EMA momentum of the teacher centre (DINO: 0.9).
        centering: ``"centering"`` or ``"sinkhorn_knopp"``.

    Raises:
        ValueError: For an unknown ``centering`` or an out-of-range number.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__(out_dim, student_temp, center_momentum, centering, name="out_dim")

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
