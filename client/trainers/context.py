"""What a stage trainer needs besides the weights: the parsed request, seeds, the device.

The server's ConfigRecord is parsed into a :class:`TrainRequest` at the
boundary, so the trainers see typed, range-checked values and never a Flower
type. Errors here are :class:`DeclineError`: the ClientApp turns them into a
decline whose reason the coordinator reads, so their messages are written by
this module and never quote patient data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmri.config.schema import FedmriConfig
from fedmri.errors import FedmriError
from fedmri.protocol import PROTOCOL_VERSION
from fedmri import stages as stage_registry
from fedmri.wire import State, groups_in

SITE_DP_MODES = ("off", "local", "central")
# Per-round hyperparameters a request may carry; each stage requires its own (fedmri.stages).
_HYPERPARAMETERS = ("lr", "weight-decay", "teacher-momentum", "teacher-temp")


class DeclineError(FedmriError):
    """The site will not run this request; the message is the reason the coordinator sees.

    Raise it only with text written in fedmri (no paths, report text, UIDs).
    """


class RequestError(DeclineError, ValueError):
    """The server's message is malformed or does not fit this site's model."""


@dataclass(frozen=True)
class TrainRequest:
    """One round's instructions, from the message's ConfigRecord.

    Hyperparameters that a stage does not use are ``None``.
    """

    # A registered stage (fedmri.stages), e.g. "pretrain".
    stage: str
    # 1-based round within the stage.
    round: int
    # Global round counter of the run (for logs only).
    server_round: int
    # Optimisation steps to run this round (0 for evaluate).
    local_steps: int
    # The run's seed; every random draw at the site derives from it.
    seed: int
    # The run's name (for logs only).
    run_name: str
    # YAML of the run's resolved FedmriConfig (see :func:`parse_run_config`).
    fedmri_config: str
    lr: float | None = None
    weight_decay: float | None = None
    teacher_momentum: float | None = None
    teacher_temp: float | None = None
    # FedProx proximal weight; 0 = plain local SGD (FedAvg).
    proximal_mu: float = 0.0
    # Catalog split that evaluate reads.
    split: str = "val"
    # Evaluate also scores the task heads (a heads stage ran before this evaluation).
    evaluate_heads: bool = False
    # Evaluate also scores zero-shot findings (an align stage ran before this
    # evaluation); a server that does not say is taken to have aligned.
    evaluate_aligned: bool = True
    # Sample-level DP-SGD asked for by the coordinator (the site may require it anyway).
    dp: bool = False
    # DP-SGD noise multiplier; None = derive it from ``dp_target_epsilon``.
    dp_noise_multiplier: float | None = None
    # ε the stage should spend at this site over all its rounds (at the site's δ).
    dp_target_epsilon: float | None = None
    # Per-sample clipping norm C.
    dp_max_grad_norm: float = 1.0
    # Rounds of this stage in the run: a target ε is spread over all of them.
    stage_rounds: int = 1
    # Site-level DP: "off", "local" (the site clips and noises its update) or "central"
    # (the coordinator does; the site only learns that it is asked).
    site_dp: str = "off"
    # Site-level DP noise multiplier z (noise std z * clip) and update clipping norm.
    site_dp_noise_multiplier: float = 0.0
    site_dp_clip_norm: float = 0.0

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TrainRequest:
        """Parse and check a ConfigRecord's values (any mapping).

        Raises:
            RequestError: For a missing key, a wrong type or an out-of-range value.
        """
        protocol = config_value(values, "protocol-version", int, default=PROTOCOL_VERSION)
        if protocol != PROTOCOL_VERSION:
            raise RequestError(f"the server speaks protocol {protocol}, this site {PROTOCOL_VERSION}; "
                               "coordinator and site must run compatible fedmri releases")
        stage = config_value(values, "stage", str)
        if stage not in stage_registry.names():
            raise RequestError(f"unknown stage {stage!r}; this site knows {', '.join(stage_registry.names())}")
        spec = stage_registry.get(stage)
        required = spec.hyperparameters
        hyper = {key.replace("-", "_"): config_value(values, key, float, default=_MISSING if key in required else None)
                 for key in _HYPERPARAMETERS}
        req = cls(
            stage=stage,
            round=config_value(values, "round", int),
            server_round=config_value(values, "server-round", int),
            local_steps=config_value(values, "local-steps", int, default=_MISSING if spec.trains else 0),
            seed=config_value(values, "seed", int),
            run_name=config_value(values, "run-name", str),
            fedmri_config=config_value(values, "fedmri-config", str),
            proximal_mu=config_value(values, "proximal-mu", float, default=0.0),
            split=config_value(values, "split", str, default="val"),
            evaluate_heads=config_value(values, "evaluate-heads", bool, default=False),
            evaluate_aligned=config_value(values, "evaluate-aligned", bool, default=True),
            dp=config_value(values, "dp", bool, default=False),
            dp_noise_multiplier=config_value(values, "dp-noise-multiplier", float, default=None),
            dp_target_epsilon=config_value(values, "dp-target-epsilon", float, default=None),
            dp_max_grad_norm=config_value(values, "dp-max-grad-norm", float, default=1.0),
            stage_rounds=config_value(values, "stage-rounds", int, default=1),
            site_dp=config_value(values, "site-dp", str, default="off"),
            site_dp_noise_multiplier=config_value(values, "site-dp-noise-multiplier", float, default=0.0),
            site_dp_clip_norm=config_value(values, "site-dp-clip-norm", float, default=0.0),
            **hyper,
        )
        req._check()
        return req

    @property
    def trains(self) -> bool:
        """The stage sends an update back (fedmri.stages.StageSpec.trains)."""
        return stage_registry.get(self.stage).trains

    def _check(self) -> None:
        if self.round < 1 or self.server_round < 1:
            raise RequestError(f"round {self.round} and server-round {self.server_round} must be >= 1")
        if self.trains and self.local_steps < 1:
            raise RequestError(f"local-steps {self.local_steps} must be >= 1 for stage {self.stage}")
        for name in ("lr", "weight_decay", "proximal_mu"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise RequestError(f"{name.replace('_', '-')} {value} must be >= 0")
        if self.teacher_momentum is not None and not 0.0 <= self.teacher_momentum <= 1.0:
            raise RequestError(f"teacher-momentum {self.teacher_momentum} must be in [0, 1]")
        if self.teacher_temp is not None and not self.teacher_temp > 0.0:
            raise RequestError(f"teacher-temp {self.teacher_temp} must be > 0")
        if self.split not in ("train", "val", "test"):
            raise RequestError(f"split {self.split!r} is not one of train, val, test")
        self._check_dp()

    def _check_dp(self) -> None:
        if self.stage_rounds < 1:
            raise RequestError(f"stage-rounds {self.stage_rounds} must be >= 1")
        if self.dp:
            if not self.trains:
                raise RequestError(f"dp is for training stages ({_training_stages()}), not {self.stage}")
            if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
                raise RequestError("dp needs exactly one of dp-noise-multiplier and dp-target-epsilon")
            for name in ("dp_noise_multiplier", "dp_target_epsilon", "dp_max_grad_norm"):
                value = getattr(self, name)
                if value is not None and not (math.isfinite(value) and value > 0):
                    raise RequestError(f"{name.replace('_', '-')} {value} must be a finite number > 0")
        if self.site_dp not in SITE_DP_MODES:
            raise RequestError(f"site-dp {self.site_dp!r} is not one of {', '.join(SITE_DP_MODES)}")
        if self.site_dp != "off":
            if not self.trains:
                raise RequestError(f"site-dp is for training stages ({_training_stages()}), not {self.stage}")
            if not (self.site_dp_clip_norm > 0 and self.site_dp_noise_multiplier > 0):
                raise RequestError("site-dp needs site-dp-clip-norm > 0 and site-dp-noise-multiplier > 0")


_MISSING = object()


def _training_stages() -> str:
    return ", ".join(n for n in stage_registry.names() if stage_registry.get(n).trains)


def config_value(values: Mapping[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """``values[key]`` checked to be a ``kind`` (an int is a float; a bool is no number), else ``default``.

    Raises:
        RequestError: The key is missing without a default, or has another type.
    """
    if key not in values:
        if default is _MISSING:
            raise RequestError(f"the message's config lacks {key!r}")
        return default
    value = values[key]
    # bool is an int in Python; a flag where a number belongs is a server bug.
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise RequestError(f"config key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


@functools.lru_cache(maxsize=4)
def parse_run_config(text: str) -> DictConfig:
    """The run's config from the YAML the server sends, checked against this site's schema.

    Merged as :func:`fedmri.config.load_config` merges a user file: schema
    defaults, then the file; unknown keys and wrong types are errors (a site on
    a different fedmri version than the coordinator). Read-only; cached, since
    every round of a run sends the same text.

    Raises:
        RequestError: The text is not YAML or does not fit the schema.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise RequestError("fedmri-config is not valid YAML") from None
    if not isinstance(data, dict):
        raise RequestError("fedmri-config must be a YAML mapping of config sections")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(FedmriConfig), data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise RequestError(f"fedmri-config does not fit this site's fedmri version (key {key!r}); "
                           "coordinator and site must run the same fedmri release") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


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
