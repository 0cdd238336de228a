"""What a stage trainer needs besides the weights: seeds, the device, threads, key checks.

The server's ConfigRecord is parsed into a :class:`fedmri.protocol.TrainRequest`
at the boundary, so the trainers see typed, range-checked values and never a
Flower type. Errors here are :class:`DeclineError`: the ClientApp turns them
into a decline whose reason the coordinator reads, so their messages are
written by fedmri and never quote patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# The request schema and its errors live in the protocol; the trainers import them from here too.
from fedmri.protocol import (  # noqa: F401 -- re-exported
    SITE_DP_MODES,
    DeclineError,
    RequestError,
    TrainRequest,
    config_value,
    parse_run_config,
)
from fedmri.wire import State, groups_in


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same on every machine and Python run.

    Sites seed with ``(run seed, stage, round, site name)``: the node id is
    assigned by the SuperLink on each connection, so seeding on it would make
    a rerun differ; the site's name is fixed by its admin.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def round_seed(request: TrainRequest, site_name: str) -> int:
    """The seed of one site's work in one round."""
    return derive_seed(request.seed, request.stage, request.round, site_name)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators inside the block and restore them after.

    Stochastic depth and the text tower's dropout draw from the global
    generator; forking keeps the caller's random stream untouched.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def site_device(site_cfg: Any) -> torch.device:
    """The torch device that ``site.yaml`` names.

    Raises:
        DeclineError: A CUDA device on a machine without one.
    """
    device = torch.device(site_cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeclineError(f"site device {site_cfg.device!r} is not available on the site's machine")
    return device


def configure_torch(site_cfg: Any) -> None:
    """Apply the site's thread count (0 keeps torch's default)."""
    if site_cfg.threads > 0 and torch.get_num_threads() != site_cfg.threads:
        torch.set_num_threads(int(site_cfg.threads))


def check_state_keys(state: State, expected: State | Mapping[str, Any], what: str) -> None:
    """The state must carry exactly ``expected``'s keys.

    Raises:
        RequestError: Naming one missing or unexpected key (model parameter
            names only) and the groups involved.
    """
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        detail = (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else "") + (
            ", " if missing and extra else "") + (f"{len(extra)} unexpected (e.g. {extra[0]!r})" if extra else "")
        raise RequestError(f"the {what} weights do not fit this site's model: {detail}; groups sent "
                           f"{groups_in(state)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise RequestError(f"wire key {k!r} has shape {tuple(v.shape)}, the {what} model expects "
                               f"{tuple(expected[k].shape)}")
