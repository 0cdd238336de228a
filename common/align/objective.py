"""The alignment objective: the chosen loss plus the optional site-local queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fedmri.align.model import LOSSES
from fedmri.align.queue import TextQueue
from fedmri.errors import ConfigError
from fedmri.losses.clip_loss import ClipLoss
from fedmri.losses.siglip_loss import SigLipLoss


class AlignObjective(nn.Module):
    """Turns :class:`~fedmri.align.model.AlignedModel` output into named losses.

    After each call the batch's text embeddings join the queue, so a batch
    never sees itself among the queued negatives.

    Args:
        loss: ``"clip"`` (symmetric InfoNCE) or ``"siglip"`` (pairwise sigmoid).
        queue_size: Past text embeddings kept as extra image->text negatives; 0 = none.
        embed_dim: Width of the shared space (for the queue).

    Raises:
        ConfigError: For an unknown loss or a negative queue size.
    """

    def __init__(self, loss: str = "clip", queue_size: int = 0, embed_dim: int = 512) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"align.loss {loss!r} is not one of {', '.join(LOSSES)}")
        if queue_size < 0:
            raise ConfigError(f"align.queue_size {queue_size} must be >= 0 (0 = no queue)")
        self.loss_name = loss
        self.loss_fn: ClipLoss | SigLipLoss = ClipLoss() if loss == "clip" else SigLipLoss()
        self.queue = TextQueue(queue_size, embed_dim) if queue_size else None

    @property
    def per_sample_decomposable(self) -> bool:
        """False for both losses: their in-batch negatives couple the samples."""
        return self.loss_fn.per_sample_decomposable

    def forward(self, out: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{"align_loss": scalar}`` from the model's output dict."""
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        queued = self.queue.get().to(txt) if self.queue is not None and len(self.queue) else None
        if isinstance(self.loss_fn, SigLipLoss):
            loss = self.loss_fn(img, txt, scale, out.get("logit_bias"), text_queue=queued)
        else:
            loss = self.loss_fn(img, txt, scale, text_queue=queued)
        if self.queue is not None:
            self.queue.enqueue(txt)
        return {"align_loss": loss}


def build_align_objective(cfg: Any) -> AlignObjective:
    """The objective that ``cfg.align`` (or an ``AlignConfig``) describes."""
    align = cfg.align if hasattr(cfg, "align") else cfg
    return AlignObjective(align.loss, align.queue_size, align.embed_dim)
