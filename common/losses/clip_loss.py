"""Symmetric InfoNCE over image-report pairs (Radford et al. 2021, CLIP).

Follows open_clip's ``ClipLoss`` (``src/open_clip/loss.py``) for one process: a
site trains on its own batch, so there is nothing to gather. An optional queue
of past text embeddings adds negatives to the image->text direction only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy; pair i is row i, column i.

    Every term's softmax runs over the whole batch, so a sample's loss depends
    on the others: the loss is not a sum of per-sample terms and per-sample
    clipping (DP-SGD) gives no valid guarantee for it.
    """

    per_sample_decomposable = False

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        text_queue: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Scaled similarity logits in both directions.

        Args:
            image_features: L2-normalised image embeddings (B, E).
            text_features: L2-normalised text embeddings (B, E).
            logit_scale: Scalar multiplier (already exponentiated and clamped).
            text_queue: Optional past text embeddings (Q, E), detached; extra
                image->text columns.

        Returns:
            ``(logits_per_image (B, B+Q), logits_per_text (B, B))``, float32.
        """
        # fp32 even under autocast: a bf16 cosine is off by up to 2^-9, which a logit scale
        # of up to 100 turns into ~0.2 of error in every logit.
        with torch.autocast(image_features.device.type, enabled=False):
            image_features, text_features = image_features.float(), text_features.float()
            logits_per_image = logit_scale.float() * image_features @ text_features.T  # B, B
            logits_per_text = logits_per_image.T  # B, B
            if text_queue is not None and text_queue.shape[0] > 0:
                extra = logit_scale.float() * image_features @ text_queue.detach().float().T  # B, Q
                logits_per_image = torch.cat([logits_per_image, extra], dim=1)  # B, B+Q
        return logits_per_image, logits_per_text

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        text_queue: Tensor | None = None,
    ) -> Tensor:
        """The scalar loss; see :meth:`get_logits` for the arguments."""
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must both be (B, E)")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, text_queue)
        labels = torch.arange(image_features.shape[0], device=image_features.device)  # B
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
