"""Stage trainers: plain functions from (site, run config, weights, request) to (weights, metrics).

They know nothing of Flower; :mod:`fedmri.client.app` parses the message into
a :class:`TrainRequest`, calls one of them and packs the reply.
"""

from __future__ import annotations

from fedmri.client.trainers.context import (
    DeclineError,
    RequestError,
    TrainRequest,
    configure_torch,
    derive_seed,
    parse_run_config,
    round_seed,
)
from fedmri.lazy import lazy_attributes

# The trainers pull in MONAI and transformers: load them when a round needs one.
__getattr__ = lazy_attributes(__name__, {
    "run_pretrain": "fedmri.client.trainers.pretrain",
    "run_align": "fedmri.client.trainers.align",
    "run_evaluate": "fedmri.client.trainers.evaluate",
    "run_heads": "fedmri.client.trainers.heads",
})

__all__ = [
    "DeclineError",
    "RequestError",
    "TrainRequest",
    "configure_torch",
    "derive_seed",
    "parse_run_config",
    "round_seed",
    "run_align",
    "run_evaluate",
    "run_heads",
    "run_pretrain",
]
