"""Image-report alignment: the two-tower model, its objective, queue and metrics.

The objective (which pulls in the losses) and the zero-shot findings (which
pull in the heads' metrics) load on first use, so rebuilding an exported model
imports only model classes.
"""

from __future__ import annotations

from fedmri.align.model import AlignedModel, build_aligned_model
from fedmri.align.queue import TextQueue
from fedmri.align.retrieval import retrieval_metrics, retrieval_ranks
from fedmri.align.schedule import align_schedule
from fedmri.lazy import lazy_attributes

_LAZY = {"AlignObjective": "fedmri.align.objective", "build_align_objective": "fedmri.align.objective"} | {
    name: "fedmri.align.zeroshot" for name in ("FINDING_PROMPTS", "FindingPrompts", "prompt_embeddings",
                                                "zeroshot_metrics", "zeroshot_scores")}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "AlignObjective",
    "AlignedModel",
    "FINDING_PROMPTS",
    "FindingPrompts",
    "TextQueue",
    "align_schedule",
    "build_align_objective",
    "build_aligned_model",
    "prompt_embeddings",
    "retrieval_metrics",
    "retrieval_ranks",
    "zeroshot_metrics",
    "zeroshot_scores",
]
