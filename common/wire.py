"""What travels between the coordinator and the sites: named parameter groups.

Every tensor of the shared model has a key ``"<group>/<name>"``. A stage
declares which groups go down to the sites and which come back; only those
travel, so a frozen text tower or the DINO teacher never costs upload.

Groups:
    ``encoder``       the image encoder (the student backbone in pretraining).
    ``dino_head``     the student's DINO (and iBOT) projection heads.
    ``teacher``       the EMA teacher's backbone.
    ``teacher_head``  the EMA teacher's heads.
    ``center``        the DINO/iBOT teacher centres (running means of teacher outputs).
    ``text``          the text tower's trainable top layers (empty when frozen).
    ``projections``   image and text projections to the shared space.
    ``logit_scale``   the contrastive temperature (and SigLIP bias).
    ``head.<task>``   one downstream task head each (``heads.tasks``), tuned by the
                      ``heads`` stage on the frozen encoder's features.

Where the teacher lives: the coordinator keeps it, as an EMA of the aggregated
student (:func:`server_teacher_momentum`). It goes down with the student so
that every site distils from the same teacher, and never comes back up: half
the pretraining upload of shipping both. The centres come back and are
averaged, so every site centres with the same statistics.

Values on the wire are float32 tensors in a Flower ``ArrayRecord``; nothing
else (no names of patients, no per-sample values) is ever put in one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


SEP = "/"
ENCODER, DINO_HEAD, TEACHER, TEACHER_HEAD, CENTER = "encoder", "dino_head", "teacher", "teacher_head", "center"
TEXT, PROJECTIONS, LOGIT_SCALE = "text", "projections", "logit_scale"
SSL_GROUPS = (ENCODER, DINO_HEAD, TEACHER, TEACHER_HEAD, CENTER)
ALIGN_GROUPS = (ENCODER, TEXT, PROJECTIONS, LOGIT_SCALE)
HEAD_PREFIX = "head."

State = dict[str, Tensor]


def group_of(key: str) -> str:
    """The group a wire key belongs to: ``"encoder/blocks.0.norm1.weight"`` -> ``"encoder"``."""
    group, sep, _ = key.partition(SEP)
    if not sep:
        raise ValueError(f"wire key {key!r} has no group prefix ('<group>/<name>')")
    return group


def select(state: Mapping[str, Tensor], groups: Iterable[str]) -> State:
    """The entries of ``state`` in ``groups``, in ``state``'s order."""
    wanted = set(groups)
    return {k: v for k, v in state.items() if group_of(k) in wanted}


def groups_in(state: Mapping[str, Tensor]) -> list[str]:
    """Groups present in ``state``, in first-seen order."""
    return list(dict.fromkeys(group_of(k) for k in state))


def group_digest(entries: Mapping[str, Tensor]) -> str:
    """SHA-256 of wire entries as they travel: every key, shape and float32 bytes, in key order.

    A request names each down group by the digest of its entries
    (``fedmri.protocol.DIGESTS_KEY``); a site's cache (``fedmri.client.group_cache``)
    checks what it stores and reads against it.
    """
    h = hashlib.sha256()
    for key in sorted(entries):
        t = entries[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}\x1f{list(t.shape)}\x1e".encode())
        h.update(t.numpy())
    return h.hexdigest()


def group_digests(state: Mapping[str, Tensor]) -> dict[str, str]:
    """group -> :func:`group_digest` of its entries, for every group in ``state`` (first-seen order)."""
    by_group: dict[str, dict[str, Tensor]] = {}
    for k, v in state.items():
        by_group.setdefault(group_of(k), {})[k] = v
    return {g: group_digest(entries) for g, entries in by_group.items()}


def module_state(prefix: str, module: nn.Module, *, only_trainable: bool = False) -> State:
    """``module``'s state dict (or its trainable parameters) as wire entries ``"<prefix><name>"``."""
    if only_trainable:
        return {f"{prefix}{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad}
    return {f"{prefix}{n}": t.detach() for n, t in module.state_dict().items()}


def _heads(net: nn.ModuleDict) -> nn.ModuleDict:
    return nn.ModuleDict({k: v for k, v in net.items() if k != "backbone"})


def ssl_state(meta: Any) -> State:
    """Wire state of an :class:`fedmri.ssl.SSLMetaArch`."""
    out = module_state(f"{ENCODER}{SEP}", meta.student["backbone"])
    out |= module_state(f"{DINO_HEAD}{SEP}", _heads(meta.student))
    out |= module_state(f"{TEACHER}{SEP}", meta.teacher["backbone"])
    out |= module_state(f"{TEACHER_HEAD}{SEP}", _heads(meta.teacher))
    for name in ("dino_loss", "ibot_loss"):
        loss = getattr(meta, name)
        if loss is not None:
            out[f"{CENTER}{SEP}{name.removesuffix('_loss')}"] = loss.center.detach()
    return out


def align_state(model: Any) -> State:
    """Wire state of an :class:`fedmri.align.AlignedModel`; ``text`` holds only its trainable layers."""
    out = module_state(f"{ENCODER}{SEP}", model.image_encoder)
    out |= module_state(f"{TEXT}{SEP}", model.text_tower, only_trainable=True)
    out[f"{PROJECTIONS}{SEP}image_proj.weight"] = model.image_proj.weight.detach()
    out[f"{PROJECTIONS}{SEP}text_proj.weight"] = model.text_proj.weight.detach()
    out[f"{LOGIT_SCALE}{SEP}logit_scale"] = model.logit_scale.detach()
    if model.logit_bias is not None:
        out[f"{LOGIT_SCALE}{SEP}logit_bias"] = model.logit_bias.detach()
    return out


def _targets_ssl(meta: Any) -> dict[str, Tensor]:
    # The live tensors that ssl_state reads, so loading writes in place.
    out: dict[str, Tensor] = {}
    for group, module in ((ENCODER, meta.student["backbone"]), (DINO_HEAD, _heads(meta.student)),
                          (TEACHER, meta.teacher["backbone"]), (TEACHER_HEAD, _heads(meta.teacher))):
        out |= {f"{group}{SEP}{n}": t for n, t in module.state_dict(keep_vars=True).items()}
    for name in ("dino_loss", "ibot_loss"):
        loss = getattr(meta, name)
        if loss is not None:
            out[f"{CENTER}{SEP}{name.removesuffix('_loss')}"] = loss.center
    return out


def _targets_align(model: Any) -> dict[str, Tensor]:
    out = {f"{ENCODER}{SEP}{n}": t for n, t in model.image_encoder.state_dict(keep_vars=True).items()}
    out |= {f"{TEXT}{SEP}{n}": p for n, p in model.text_tower.named_parameters() if p.requires_grad}
    out[f"{PROJECTIONS}{SEP}image_proj.weight"] = model.image_proj.weight
    out[f"{PROJECTIONS}{SEP}text_proj.weight"] = model.text_proj.weight
    out[f"{LOGIT_SCALE}{SEP}logit_scale"] = model.logit_scale
    if model.logit_bias is not None:
        out[f"{LOGIT_SCALE}{SEP}logit_bias"] = model.logit_bias
    return out


def load_into(targets: Mapping[str, Tensor], state: Mapping[str, Tensor], what: str, *, exact: bool = False) -> None:
    """Copy wire entries into the live tensors ``targets`` (same keys), in place.

    Args:
        targets: Wire key -> the module's tensor (``state_dict(keep_vars=True)``).
        state: Wire entries; a subset of ``targets`` unless ``exact``.
        what: The model, for error messages.
        exact: Every key of ``targets`` must be in ``state``.

    Raises:
        ValueError: Naming one missing (``exact``) or unknown key, or one of the wrong shape.
    """
    missing = [k for k in targets if k not in state] if exact else []
    if missing:
        raise ValueError(f"{len(missing)} weights of the {what} missing from the state, e.g. {missing[0]!r}")
    unknown = [k for k in state if k not in targets]
    if unknown:
        raise ValueError(f"{len(unknown)} wire keys do not belong to the {what}, e.g. {unknown[0]!r}: "
                         "coordinator and site run different model configs")
    with torch.no_grad():
        for k, v in state.items():
            t = targets[k]
            if tuple(t.shape) != tuple(v.shape):
                raise ValueError(f"wire key {k!r} has shape {tuple(v.shape)}, the {what} expects {tuple(t.shape)}")
            t.copy_(v.to(dtype=t.dtype, device=t.device))


def load_ssl_state(meta: Any, state: Mapping[str, Tensor]) -> None:
    """Copy wire tensors into an SSLMetaArch in place; keys absent from ``state`` are left as they are."""
    load_into(_targets_ssl(meta), state, "SSL model")


def load_align_state(model: Any, state: Mapping[str, Tensor]) -> None:
    """Copy wire tensors into an AlignedModel in place; keys absent from ``state`` are left as they are."""
    load_into(_targets_align(model), state, "aligned model")


@dataclass(frozen=True)
class StageGroups:
    """Which groups a stage sends to the sites (``down``) and takes back (``up``).

    ``moves`` are down groups that the coordinator changes after a round besides the
    ``up`` ones (pretraining's teacher, an EMA of the aggregated student). What is
    left, :attr:`kept`, stays as it is after the round: only those groups are worth
    a site's cache (fedmri.server.downlink, fedmri.client.group_cache). A moved teacher
    group whose student goes down with it is :attr:`rebuilt`: a site that holds the
    teacher it was sent last makes the new one from the student (:data:`TEACHER_SOURCES`).
    """

    down: tuple[str, ...]
    up: tuple[str, ...]
    moves: tuple[str, ...] = ()

    @property
    def kept(self) -> tuple[str, ...]:
        """The down groups a round leaves unchanged."""
        return tuple(g for g in self.down if g not in self.up and g not in self.moves)

    @property
    def rebuilt(self) -> tuple[str, ...]:
        """The moved groups a site can rebuild from the round's other down groups."""
        return tuple(g for g in self.moves if g in self.down and TEACHER_SOURCES.get(g) in self.down)


def stage_groups(stage: str, cfg: Any) -> StageGroups:
    """The groups that travel in ``stage`` under the run config ``cfg`` (the stage registry's ``groups``).

    Raises:
        ConfigError: For an unknown stage.
    """
    from fedmri.stages import get  # the registry builds on this module

    return get(stage).groups(cfg)


def head_groups(cfg: Any) -> tuple[str, ...]:
    """One group per downstream task of ``cfg.heads.tasks``, ``head.<task>``, after ``head.trunk`` if they share one."""
    from fedmri.heads.tasks import TRUNK, has_trunk

    trunk = (f"{HEAD_PREFIX}{TRUNK}",) if has_trunk(cfg) else ()
    return (*trunk, *(f"{HEAD_PREFIX}{task}" for task in cfg.heads.tasks))


def server_teacher_momentum(step_momentum: float, local_steps: int) -> float:
    """Per-round EMA momentum of the coordinator's teacher.

    Centrally the teacher moves ``1 - m`` of the way to the student every step.
    A round is ``local_steps`` steps at every site, so the coordinator applies
    ``m ** local_steps`` once to the aggregated student: the teacher lags the
    student by the same number of optimisation steps as it would centrally.
    """
    if not 0.0 <= step_momentum <= 1.0 or local_steps < 0:
        raise ValueError(f"momentum {step_momentum} must be in [0, 1] and local_steps {local_steps} >= 0")
    return float(step_momentum) ** int(local_steps)


# The coordinator's teacher is a function of the student it sends with it (an EMA, or a copy
# before the first move): a site that holds the teacher it was sent last rebuilds this one
# from the student and checks it against the request's digest (fedmri.server.downlink,
# fedmri.client.group_cache), so the teacher need not travel.
TEACHER_SOURCES = {TEACHER: ENCODER, TEACHER_HEAD: DINO_HEAD}


def _teacher_key(group: str, student_key: str) -> str:
    """The key of teacher ``group`` that mirrors ``student_key`` of its student group."""
    return group + student_key[len(TEACHER_SOURCES[group]):]


def _ema(teacher: Tensor, student: Tensor, momentum: float) -> Tensor:
    # One formula for the coordinator and the sites: a rebuilt teacher is bit-identical.
    return teacher * momentum + student * (1.0 - momentum)


def round_bf16(t: Tensor) -> Tensor:
    """``t`` rounded to the nearest bfloat16 (ties to even), as float32: what a bf16 downlink delivers."""
    return t.detach().to(torch.bfloat16).to(torch.float32)


def update_teacher(state: State, momentum: float, *, bf16_student: bool = False) -> None:
    """EMA of the student into the teacher, in place: teacher <- m teacher + (1 - m) student.

    ``bf16_student``: the sites are sent the student rounded to bfloat16 (a bf16 downlink), so the
    teacher follows the student they see, and each site can rebuild it bit for bit.
    """
    with torch.no_grad():
        for teacher, student in TEACHER_SOURCES.items():
            for k in [k for k in state if group_of(k) == student]:
                t_key = _teacher_key(teacher, k)
                s = round_bf16(state[k]) if bf16_student else state[k]
                state[t_key] = _ema(state[t_key], s, momentum)


def teacher_is_copy(state: Mapping[str, Tensor], group: str, *, bf16_student: bool = False) -> bool:
    """Whether teacher group ``group`` of ``state`` equals its student group, key for key (before any move);
    with ``bf16_student``, the student rounded to bfloat16 (what the sites are sent)."""
    teacher = select(state, [group])
    student = select(state, [TEACHER_SOURCES[group]])
    if not teacher or len(teacher) != len(student):
        return False
    for k, s in student.items():
        t = teacher.get(_teacher_key(group, k))
        if t is None or t.shape != s.shape or not torch.equal(t, round_bf16(s) if bf16_student else s):
            return False
    return True


def round_teacher_copy(state: State, group: str) -> bool:
    """Before the teacher first moves (a float32 copy of the student), make it the copy of the student
    rounded to bfloat16, in place, so that a site sent that student rebuilds it. Returns whether it did."""
    if not teacher_is_copy(state, group):
        return False
    for k in select(state, [TEACHER_SOURCES[group]]):
        state[_teacher_key(group, k)] = round_bf16(state[k])
    return True


def rebuild_teacher(group: str, student: Mapping[str, Tensor], previous: Mapping[str, Tensor] | None,
                    momentum: float) -> State:
    """Teacher group ``group`` from the student's entries: their copy (``previous`` None), or the
    EMA of ``previous`` (the teacher before the move) towards them, as :func:`update_teacher` does.

    Raises:
        KeyError: ``previous`` lacks a key of the student's (the caller treats it as a miss).
    """
    out: State = dict(previous) if previous is not None else {}  # keys the EMA does not reach stay
    with torch.no_grad():
        for k, s in student.items():
            t_key = _teacher_key(group, k)
            out[t_key] = s.clone() if previous is None else _ema(previous[t_key], s, momentum)
    return out


def to_record(state: Mapping[str, Tensor]) -> Any:
    """A Flower ``ArrayRecord`` of float32 CPU copies of ``state``."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def bf16_bits(t: Tensor) -> Any:
    """``t`` rounded to the nearest bfloat16, as its raw bits: a uint16 NumPy array, how the bf16 wire
    carries a value (Flower's arrays are NumPy's, which has no bfloat16)."""
    import numpy as np

    return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def bf16_to_float32(bits: Any) -> Any:
    """Float32 values of bfloat16 numbers given as their raw bits (:func:`bf16_bits`): exact, a new array."""
    import numpy as np

    out = np.empty(bits.shape, np.uint32)  # an array even for a 0-d key (logit_scale)
    return np.left_shift(bits, 16, out=out, dtype=np.uint32).view(np.float32)  # one pass, no uint32 copy first


def to_delta_record(up: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> Any:
    """A Flower ``ArrayRecord`` of ``up - sent`` rounded to bfloat16, as raw bits (uint16 arrays).

    Half the bytes of :func:`to_record`. The coordinator adds each delta to the float32
    values it sent (:func:`fedmri.strategies.validation.read_reply`), so its master copy
    stays float32 and a value's error is at most half a bfloat16 step of the delta
    (2^-9 of it): the site's training moves a weight by the delta, not by its value's
    last bits. A key that was not sent to the site, or with another shape, goes as float32.
    """
    from flwr.app import Array, ArrayRecord

    out = {}
    for k, v in up.items():
        value = v.detach().to("cpu", torch.float32)
        base = sent.get(k)
        if base is None or tuple(base.shape) != tuple(value.shape):
            out[k] = Array(value.contiguous().numpy())
            continue
        out[k] = Array(bf16_bits(value - base.detach().to("cpu", torch.float32)))
    return ArrayRecord(out)


def to_bf16_record(state: Mapping[str, Tensor]) -> Any:
    """A Flower ``ArrayRecord`` of ``state`` rounded to bfloat16, as raw bits (uint16 arrays): half the
    bytes of :func:`to_record`; :func:`from_record` reads them back as float32 (a bf16 downlink)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(bf16_bits(v)) for k, v in state.items()})


def from_record(record: Any, *, bf16: bool = False) -> State:
    """Tensors from a Flower ``ArrayRecord`` (keys kept); with ``bf16``, a uint16 array is bfloat16
    bits (:func:`to_bf16_record`) and comes back as float32.

    Raises:
        ValueError: A uint16 array without ``bf16`` (the request did not announce a bf16 downlink).
    """
    import numpy as np

    out = {}
    for k in record.keys():
        a = record[k].numpy()
        if a.dtype == np.uint16:
            if not bf16:
                raise ValueError(f"{k!r} came as bfloat16 bits, but the request did not ask for a bf16 downlink")
            out[k] = torch.from_numpy(bf16_to_float32(a))
        else:
            out[k] = torch.from_numpy(a.copy())
    return out


def initial_state(cfg: Any) -> State:
    """The coordinator's starting state for every group, seeded by ``cfg.seed``.

    The text tower's frozen layers come from the tower each site loads
    locally, so only its trainable layers are part of the state.
    """
    from fedmri.align import build_aligned_model
    from fedmri.ssl import SSLMetaArch

    from fedmri.heads.tasks import build_task_heads, task_heads_state

    torch.manual_seed(int(cfg.seed))
    meta = SSLMetaArch(cfg)
    aligned = build_aligned_model(cfg, image_encoder=meta.student["backbone"])
    heads = task_heads_state(build_task_heads(cfg)) if cfg.heads.tasks else {}
    return {k: v.clone() for k, v in (ssl_state(meta) | align_state(aligned) | heads).items()}
