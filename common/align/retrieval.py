"""Cross-modal retrieval metrics: recall at K and median rank, both directions.

Ranks are 1-based and pessimistic about ties: a wrong candidate that scores
exactly as high as the best correct one counts as ranked above it. A model
that gives every candidate the same score thus gets the worst rank, not the
best, and cannot look good by collapsing its embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedmri.errors import InputError


def retrieval_ranks(similarity: Tensor, relevant: Tensor) -> Tensor:
    """Rank of the best-scoring relevant candidate for each query (row).

    Args:
        similarity: Scores (Q, C); higher means more similar.
        relevant: Bool (Q, C); True where candidate c answers query q. Every
            row needs at least one True.

    Returns:
        Long (Q,): 1 + the number of irrelevant candidates scoring >= the best
        relevant one.
    """
    best = similarity.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values  # Q, 1
    return 1 + ((similarity >= best) & ~relevant).sum(dim=1)  # Q


def _relevance(similarity: Tensor, targets: Tensor | None) -> Tensor:
    n_img, n_txt = similarity.shape
    if targets is None:
        if n_img != n_txt:
            raise InputError(f"similarity is {n_img}x{n_txt}: without targets it must be square "
                             "(image i matches text i); pass targets for other layouts")
        return torch.eye(n_img, dtype=torch.bool, device=similarity.device)
    if targets.dtype == torch.bool:
        if targets.shape != similarity.shape:
            raise InputError(f"relevance matrix {tuple(targets.shape)} must match similarity {tuple(similarity.shape)}")
        return targets.to(similarity.device)
    if targets.shape != (n_img,):
        raise InputError(f"targets must be a bool (images, texts) matrix or the text index of each of the "
                         f"{n_img} images; got shape {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= n_txt):
        raise InputError(f"targets must be text indices in [0, {n_txt}), got values outside")
    relevant = torch.zeros(n_img, n_txt, dtype=torch.bool, device=similarity.device)
    relevant[torch.arange(n_img, device=similarity.device), targets.to(similarity.device).long()] = True
    return relevant


def _summary(prefix: str, ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks <= k).float().mean()) for k in ks}
    # Interpolated median: the mean of the two middle ranks for an even count.
    out[f"{prefix}_median_rank"] = float(torch.quantile(ranks.double(), 0.5))
    return out


def retrieval_metrics(
    similarity: Tensor,
    targets: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall at K and median rank, image->text (rows) and text->image (columns).

    Args:
        similarity: Scores (n_images, n_texts), e.g. image features @ text features.T.
        targets: ``None`` (image i matches text i), the matching text index of
            each image (n_images,), or a bool relevance matrix like ``similarity``.
            Every image needs a match; texts that match no image serve only as
            distractors (they are not text->image queries).
        ks: Cut-offs K for R@K. Default (1, 5, 10).

    Returns:
        ``{"i2t_R@1": ..., "i2t_median_rank": ..., "t2i_R@1": ..., ...}``;
        recalls are fractions in [0, 1], ranks are 1-based.

    Raises:
        InputError: For a non-2D or non-finite similarity, bad targets, or an
            image without a matching text.
    """
    if similarity.ndim != 2 or similarity.numel() == 0:
        raise InputError("similarity must be a non-empty 2D (images, texts) matrix, "
                         f"got shape {tuple(similarity.shape)}")
    if not torch.isfinite(similarity).all():
        raise InputError("similarity has NaN or infinite entries; check the embeddings")
    if any(k < 1 for k in ks):
        raise InputError(f"recall cut-offs must be >= 1, got {list(ks)}")
    sim = similarity.detach().float()
    relevant = _relevance(sim, targets)
    if not relevant.any(dim=1).all():
        raise InputError("every image needs at least one matching text; some rows of targets have none")
    has_image = relevant.any(dim=0)  # texts that are queries
    out = _summary("i2t", retrieval_ranks(sim, relevant), ks)
    out.update(_summary("t2i", retrieval_ranks(sim.T[has_image], relevant.T[has_image]), ks))
    return out
