"""iBOT masked-patch loss (Zhou et al. 2022), with DINOv2's per-image weighting.

The student sees a crop with some patch tokens replaced by the mask token and
predicts, at those positions, the teacher's prototype distribution for the
unmasked crop. Each image's masked tokens share a weight of one image, so an
image with many masked patches counts as much as one with few.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fedmri.losses.teacher_targets import CenteredTeacherLoss


def masked_token_weights(masks: Tensor) -> Tensor:
    """Weight of each masked token: 1 / (masked tokens of its image).

    Args:
        masks: (B, N) bool.

    Returns:
        (M,) weights in the order of ``masks.nonzero()``, M = masks.sum().
    """
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # B
    return per_image.unsqueeze(-1).expand_as(masks)[masks]  # M


class iBOTPatchLoss(CenteredTeacherLoss):  # noqa: N801 (the method's own spelling)
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

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__(patch_out_dim, student_temp, center_momentum, centering, name="patch_out_dim")

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
