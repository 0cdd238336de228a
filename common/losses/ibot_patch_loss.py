"""iBOT masked-patch loss (Zhou et al. 2022), with DINOv2's per-image weighting.

The student sees a crop with some patch tokens replaced by the mask token and
predicts, at those positions, the teacher's prototype distribution for the
unmasked crop. Each image's masked tokens share a weight of one image, so an
image with many masked patches counts as much as one with few.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.losses.dino_clstoken_loss import CENTERINGS, sinkhorn_knopp


def masked_token_weights(masks: Tensor) -> Tensor:
    """Weight of each masked token: 1 / (masked tokens of its image).

    Args:
        masks: (B, N) bool.

    Returns:
        (M,) weights in the order of ``masks.nonzero()``, M = masks.sum().
    """
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # B
    return per_image.unsqueeze(-1).expand_as(masks)[masks]  # M


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the method's own spelling)
    """Cross-entropy between student and teacher prototypes at masked patches.

    Args:
        patch_out_dim: Number of prototypes K of the patch head.
        student_temp: Student softmax temperature (DINOv2: 0.1).
        center_momentum: EMA momentum of the patch-token centre (0.9).
        centering: ``"centering"`` or ``"sinkhorn_knopp"``.

    Raises:
        ValueError: For an unknown ``centering`` or an out-of-range number.
    """

    # Image b's term reads only image b's tokens and the detached centre of
    # earlier batches; the division by the number of images is a constant.
    # Sinkhorn-Knopp couples all masked tokens of the batch (see __init__).
    per_sample_decomposable: bool = True

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__()
        if patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be >= 1, got {patch_out_dim}")
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
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities (M, K) at the masked positions from logits (M, K)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the mean teacher logit over masked tokens (M, K); a no-op if M = 0."""
        if teacher_logits.shape[0] == 0:
            return
        batch_center = teacher_logits.float().mean(dim=0, keepdim=True)  # 1, K
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """Mean over images of each image's mean masked-token cross-entropy.

        Args:
            student_logits: (M, K) student logits at ``masks.nonzero()`` positions.
            teacher_probs: (M, K) teacher targets at the same positions.
            masks: (B, N) bool masks of the B student crops (images without a
                masked token count in B with a zero term, as in DINOv2).

        Returns:
            Scalar loss.
        """
        n_masked = int(masks.sum())
        if student_logits.shape[0] != n_masked or teacher_probs.shape[0] != n_masked:
            raise ValueError(f"expected {n_masked} masked rows (masks.sum()), got student "
                             f"{student_logits.shape[0]} and teacher {teacher_probs.shape[0]}")
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # M, K
        per_token = (teacher_probs * log_p).sum(dim=-1)  # M
        return -(per_token * masked_token_weights(masks)).sum() / masks.shape[0]
