"""Image-report alignment: the two-tower model, its objective, queue and metrics.

The objective (which pulls in the losses) loads on first use, so rebuilding an
exported model imports only model classes.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedmri.align.model import AlignedModel, build_aligned_model
from fedmri.align.queue import TextQueue
from fedmri.align.retrieval import retrieval_metrics, retrieval_ranks

_LAZY = {"AlignObjective": "fedmri.align.objective", "build_align_objective": "fedmri.align.objective"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedmri.align' has no attribute {name!r}")


__all__ = [
    "AlignObjective",
    "AlignedModel",
    "TextQueue",
    "build_align_objective",
    "build_aligned_model",
    "retrieval_metrics",
    "retrieval_ranks",
]
