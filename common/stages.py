"""The stage registry: everything the coordinator, the sites and the config checks know about a stage.

A run is a list of stages (``pretrain -> align -> heads -> evaluate``). Each
stage is one :class:`StageSpec`: which parameter groups go down and come back,
whether the sites train or only score, which per-round hyperparameters the
coordinator schedules and the site requires, the site's trainer function, and
what the coordinator does after aggregating (the teacher EMA of pretraining).
The ServerApp (``fedmri.server.pipeline``), the ClientApp
(``fedmri.client.app``), the request parser (``fedmri.protocol``), the
federation checks and the simulation runner look stages up here; none of them
branches on a stage's name. A new stage is a :func:`register` call and its
trainer (docs/architecture.md, "A stage's life cycle").

A trainer is ``trainer(site_cfg, run_cfg, state_down, request, *, privacy)``
returning ``(state_up, metrics)``: the up groups' tensors (empty for a stage
that does not train) and aggregate numeric metrics.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fedmri import wire
from fedmri.errors import ConfigError
from fedmri.wire import (
    ALIGN_GROUPS,
    CENTER,
    DINO_HEAD,
    ENCODER,
    LOGIT_SCALE,
    PROJECTIONS,
    SSL_GROUPS,
    TEACHER,
    TEACHER_HEAD,
    TEXT,
    StageGroups,
    State,
    head_groups,
)


@dataclass(frozen=True)
class RoundInputs:
    """What the coordinator knows when it writes a round's hyperparameters."""

    # The run's resolved FedmriConfig.
    cfg: Any
    # The stage's entry of the federation config (rounds, local_steps, split, dp, ...).
    stage: Any
    # Progress through the stage at the middle of this round, in (0, 1).
    fraction: float
    # Specs of the stages that ran before this one in the run.
    earlier: Sequence[StageSpec]


@dataclass(frozen=True)
class StageSpec:
    """One stage of a run.

    ``trainer`` is a function or a ``"module:function"`` path, imported at the site
    when a round of the stage arrives (the trainers pull in MONAI and transformers).
    """

    name: str
    # The groups that travel under a run config: (cfg) -> StageGroups.
    groups: Callable[[Any], StageGroups]
    trainer: str | Callable[..., tuple[State, dict[str, float]]]
    # True: sites send an update that the coordinator validates and aggregates (a
    # Flower TRAIN message). False: sites only score the model (EVALUATE); no weights
    # come back, and any site that scored counts.
    trains: bool = True
    # Per-round values the site must find in the request (TrainRequest fields).
    hyperparameters: tuple[str, ...] = ()
    # The round's stage-specific request fields: (RoundInputs) -> {TrainRequest field: value}.
    round_values: Callable[[RoundInputs], dict[str, Any]] | None = None
    # After aggregation, at the coordinator: (state, the round's TrainRequest, stage config) ->
    # the EMA momentum it moved the groups' ``rebuilt`` teacher by (None: not an EMA), changing
    # the global state in place. The sites rebuild the next teacher with that momentum.
    after_aggregate: Callable[[State, Any, Any], float | None] | None = None
    # Checks of a federation's stage entry beyond the common ones: (run cfg, stage cfg, where).
    check: Callable[[Any, Any, str], None] | None = None
    # It trains the shared encoder (the random-init baseline leaves it out).
    builds_encoder: bool = False
    # After it the encoder shares a space with the text tower (zero-shot, search, aligned export).
    aligns: bool = False
    # It tunes the task heads (evaluation scores them; the export carries them).
    tunes_heads: bool = False
    @property
    def message_type(self) -> str:
        """Flower message type of its requests."""
        return "train" if self.trains else "evaluate"

    def train(self, site_cfg: Any, run_cfg: Any, state: State, request: Any, *,
              privacy: Any = None) -> tuple[State, dict[str, float]]:
        """Run the stage's trainer at a site."""
        trainer = self.trainer
        if isinstance(trainer, str):
            module, _, name = trainer.partition(":")
            trainer = getattr(importlib.import_module(module), name)
        return trainer(site_cfg, run_cfg, state, request, privacy=privacy)


_REGISTRY: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add a stage; its name must be new."""
    if spec.name in _REGISTRY:
        raise ValueError(f"stage {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(spec: StageSpec) -> Iterator[StageSpec]:
    """A stage that exists inside the block only (tests, experiments)."""
    register(spec)
    try:
        yield spec
    finally:
        _REGISTRY.pop(spec.name, None)


def names(*, trains: bool | None = None) -> tuple[str, ...]:
    """The registered stages, in registration order: every one, or those that train (``trains=True``)
    or only score (``trains=False``)."""
    return tuple(n for n, spec in _REGISTRY.items() if trains is None or spec.trains == trains)


def trainer_modules() -> tuple[str, ...]:
    """The modules of the registered stages' trainers given as ``"module:function"`` paths, in
    registration order: what a site's warm ClientApp starter imports once, so that no round's
    ClientApp pays for MONAI and transformers again (:mod:`fedmri.client.warm`)."""
    found = (spec.trainer.partition(":")[0] for spec in _REGISTRY.values() if isinstance(spec.trainer, str))
    return tuple(dict.fromkeys(found))


def get(name: str) -> StageSpec:
    """The stage called ``name``.

    Raises:
        ConfigError: No such stage.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(_REGISTRY)}") from None


# --------------------------------------------------------------- the stages
def _pretrain_groups(cfg: Any) -> StageGroups:
    return StageGroups(down=SSL_GROUPS, up=(ENCODER, DINO_HEAD, CENTER), moves=(TEACHER, TEACHER_HEAD))


def _pretrain_values(r: RoundInputs) -> dict[str, Any]:
    from fedmri.ssl import ssl_schedule

    s = ssl_schedule(r.cfg, r.fraction)
    return {"lr": s["lr"], "weight_decay": s["weight_decay"], "teacher_momentum": s["teacher_momentum"],
            "teacher_temp": s["teacher_temp"]}


def _move_teacher(state: State, request: Any, stage: Any) -> float:
    """The coordinator's teacher follows the aggregated student (fedmri.wire, "Where the teacher lives")."""
    m = wire.server_teacher_momentum(float(request.teacher_momentum), int(stage.local_steps))
    wire.update_teacher(state, m, bf16_student=request.downlink == "bf16")
    return m


def _align_groups(cfg: Any) -> StageGroups:
    up = [PROJECTIONS, LOGIT_SCALE]
    if not cfg.align.freeze_image_encoder:
        up.insert(0, ENCODER)
    if cfg.align.text_trainable_layers != 0:
        up.insert(-2, TEXT)
    down = (ENCODER, TEXT, PROJECTIONS, LOGIT_SCALE) if cfg.align.text_trainable_layers != 0 else (
        ENCODER, PROJECTIONS, LOGIT_SCALE)
    return StageGroups(down=down, up=tuple(up))


def _align_values(r: RoundInputs) -> dict[str, Any]:
    from fedmri.align import align_schedule

    s = align_schedule(r.cfg, r.fraction)
    return {"lr": s["lr"], "weight_decay": s["weight_decay"]}


def _align_check(cfg: Any, stage: Any, where: str) -> None:
    if stage.dp.enabled:
        from fedmri.align.dp_negatives import require_dp_valid

        require_dp_valid(cfg, f"{where} with dp.enabled")


def _heads_groups(cfg: Any) -> StageGroups:
    heads = head_groups(cfg)
    if not heads:
        raise ConfigError("the heads stage needs at least one task in heads.tasks")
    return StageGroups(down=(ENCODER, *heads), up=heads)


def _heads_values(r: RoundInputs) -> dict[str, Any]:
    return {"lr": float(r.cfg.heads.lr), "weight_decay": float(r.cfg.heads.weight_decay)}


def _evaluate_groups(cfg: Any) -> StageGroups:
    down = (*SSL_GROUPS, *(g for g in ALIGN_GROUPS if g != ENCODER), *head_groups(cfg))
    if cfg.align.text_trainable_layers == 0:
        down = tuple(g for g in down if g != TEXT)
    return StageGroups(down=down, up=())


def _evaluate_values(r: RoundInputs) -> dict[str, Any]:
    return {"split": str(r.stage.split), "evaluate_heads": any(s.tunes_heads for s in r.earlier),
            "evaluate_aligned": any(s.aligns for s in r.earlier)}


PRETRAIN = register(StageSpec(
    "pretrain", _pretrain_groups, "fedmri.client.trainers.pretrain:run_pretrain",
    hyperparameters=("lr", "weight_decay", "teacher_momentum", "teacher_temp"), round_values=_pretrain_values,
    after_aggregate=_move_teacher, builds_encoder=True))
ALIGN = register(StageSpec(
    "align", _align_groups, "fedmri.client.trainers.align:run_align", hyperparameters=("lr", "weight_decay"),
    round_values=_align_values, check=_align_check, builds_encoder=True, aligns=True))
HEADS = register(StageSpec(
    "heads", _heads_groups, "fedmri.client.trainers.heads:run_heads", hyperparameters=("lr", "weight_decay"),
    round_values=_heads_values, tunes_heads=True))
EVALUATE = register(StageSpec(
    "evaluate", _evaluate_groups, "fedmri.client.trainers.evaluate:run_evaluate", trains=False,
    round_values=_evaluate_values))
