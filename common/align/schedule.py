"""Per-round values of the alignment stage, as a pure function of progress."""

from __future__ import annotations

from typing import Any

from fedmri.ssl.schedules import cosine


def align_schedule(cfg: Any, fraction: float) -> dict[str, float]:
    """Learning rate (cosine from ``align.lr`` to ``align.min_lr``) and weight decay at ``fraction``.

    No warm-up: the stage starts from a pretrained encoder and fresh
    projections, and a federated stage has only a few rounds to spend.

    Args:
        cfg: A whole config or its ``align`` section.
        fraction: Stage progress in [0, 1].

    Returns:
        ``{"lr", "weight_decay"}``.
    """
    a = cfg.align if "align" in cfg else cfg
    return {"lr": cosine(fraction, float(a.lr), float(a.min_lr)), "weight_decay": float(a.weight_decay)}
