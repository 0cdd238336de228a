"""Teacher targets shared by the DINO and iBOT losses: centering or Sinkhorn-Knopp.

Both losses turn teacher prototype logits into soft targets the same way
(DINOv2 keeps a separate centre per loss), so that machinery lives here once:
argument checks, the centre buffer, the target rule and the centre's EMA.
"""

from __future__ import annotations

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


class CenteredTeacherLoss(nn.Module):
    """Base of the self-distillation losses: student temperature and teacher targets.

    Args:
        n_prototypes: Number of prototypes K.
        student_temp: Student softmax temperature (DINOv2: 0.1).
        center_momentum: EMA momentum of the teacher centre (DINO: 0.9).
        centering: ``"centering"`` or ``"sinkhorn_knopp"``.
        name: The constructor argument that holds K, for error messages.

    Raises:
        ValueError: For an unknown ``centering`` or an out-of-range number.
    """

    # With centering, a sample's target depends on that sample and the centre
    # buffer, which is detached and built from earlier batches: a sum of
    # per-sample terms (DP-SGD applies). Sinkhorn-Knopp balances targets across
    # the batch and is not; __init__ then overrides this on the instance.
    # The centre itself is a running statistic of the data: privacy work must
    # count it if it leaves the site.
    per_sample_decomposable: bool = True

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float, centering: str,
                 name: str = "out_dim") -> None:
        super().__init__()
        if n_prototypes < 1:
            raise ValueError(f"{name} must be >= 1, got {n_prototypes}")
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
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities (M, K) from teacher logits (M, K), per ``centering``."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor, momentum: float | None = None) -> None:
        """EMA of the mean teacher logit over the rows of (M, K) into the centre; a no-op if M = 0.

        Call after :meth:`teacher_targets`, so a batch is centred with the
        statistics of earlier batches only. ``momentum`` overrides ``center_momentum``.
        """
        if teacher_logits.shape[0] == 0:
            return
        m = self.center_momentum if momentum is None else momentum
        batch_center = teacher_logits.float().mean(dim=0, keepdim=True)  # 1, K
        self.center.mul_(m).add_(batch_center, alpha=1 - m)
