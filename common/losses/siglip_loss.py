"""Pairwise sigmoid loss over image-report pairs (Zhai et al. 2023, SigLIP).

Each image-text pair is its own binary problem (match or not), so the loss
needs no batch-wide softmax and behaves well at the small batch sizes a single
hospital can afford. Follows open_clip's ``SigLipLoss`` for one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SigLipLoss(nn.Module):
    """Sum over all pairs of -log sigmoid(label * logit), divided by the batch size.

    Labels are +1 on the diagonal and -1 elsewhere (and for every queued text).
    With in-batch negatives each sample's terms involve other samples, so the
    loss is not per-sample decomposable (no valid DP-SGD guarantee).
    """

    per_sample_decomposable = False

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        text_queue: Tensor | None = None,
    ) -> Tensor:
        """Pair logits ``scale * <image, text> + bias``.

        Args:
            image_features: L2-normalised image embeddings (B, E).
            text_features: L2-normalised text embeddings (B, E).
            logit_scale: Scalar multiplier (already exponentiated and clamped).
            logit_bias: Scalar bias (SigLIP initialises it at -10).
            text_queue: Optional past text embeddings (Q, E), detached; extra
                negative columns.

        Returns:
            Logits (B, B+Q), float32; row i, column i is the matching pair.
        """
        # fp32 even under autocast: a bf16 cosine is off by up to 2^-9, which the logit scale
        # multiplies into every logit.
        with torch.autocast(image_features.device.type, enabled=False):
            texts = text_features.float()
            if text_queue is not None and text_queue.shape[0] > 0:
                texts = torch.cat([texts, text_queue.detach().float()], dim=0)  # B+Q, E
            logits = logit_scale.float() * image_features.float() @ texts.T  # B, B+Q
            if logit_bias is not None:
                logits = logits + logit_bias.float()
        return logits

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        text_queue: Tensor | None = None,
    ) -> Tensor:
        """The scalar loss; see :meth:`get_logits` for the arguments."""
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must both be (B, E)")
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias, text_queue)
        b = image_features.shape[0]
        labels = -torch.ones_like(logits)  # B, B+Q
        labels[:, :b] += 2 * torch.eye(b, device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / b
