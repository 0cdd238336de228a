"""A site-local FIFO of past text embeddings: more negatives for small batches.

MoCo-style (He et al. 2020), for the image->text direction of the alignment
loss. The queue holds detached, L2-normalised text embeddings from earlier
batches of this site only. It is a separate module, never part of the model:
it is neither exported nor sent to the server.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmri.errors import ConfigError


class TextQueue(nn.Module):
    """Fixed-size ring buffer of text embeddings (oldest overwritten first).

    Entries go stale as the text projection trains; keep the queue to a few
    batches' worth (MoCo relies on a slowly moving key encoder instead).

    Args:
        size: Capacity Q in embeddings; must be >= 1.
        dim: Embedding width E.

    Raises:
        ConfigError: If ``size`` or ``dim`` is below 1.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"align.queue_size {size} must be >= 1 to build a queue (0 switches it off)")
        if dim < 1:
            raise ConfigError(f"queue embedding width {dim} must be >= 1")
        self.size = size
        self.register_buffer("embeddings", torch.zeros(size, dim))  # Q, E
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, text_features: Tensor) -> None:
        """Append a batch (B, E); when full, the oldest entries are replaced."""
        feats = text_features.detach().to(self.embeddings)  # B, E, on the queue's device and dtype
        if feats.ndim != 2 or feats.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"expected text features (B, {self.embeddings.shape[1]}), got {tuple(feats.shape)}")
        feats = feats[-self.size:]  # a batch larger than the queue keeps its newest rows
        idx = (int(self.ptr) + torch.arange(feats.shape[0], device=feats.device)) % self.size  # B
        self.embeddings[idx] = feats
        self.ptr.fill_((int(self.ptr) + feats.shape[0]) % self.size)
        self.count.fill_(min(self.size, int(self.count) + feats.shape[0]))

    def get(self) -> Tensor:
        """The stored embeddings (n, E), n <= Q, oldest first; detached."""
        n = int(self.count)
        if n < self.size:
            return self.embeddings[:n].detach()
        p = int(self.ptr)
        return torch.cat([self.embeddings[p:], self.embeddings[:p]]).detach()  # Q, E

    def reset(self) -> None:
        """Empty the queue (e.g. when a new global model arrives)."""
        self.embeddings.zero_()
        self.ptr.zero_()
        self.count.zero_()
