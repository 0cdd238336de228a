"""The message contract between the coordinator and the sites: one request schema, the reply layout, shared names.

The coordinator builds a :class:`TrainRequest` and sends :meth:`TrainRequest.to_config`
as a round's ``config`` record; the site parses it back with
:meth:`TrainRequest.from_config`, which type- and range-checks every value. That
parse is the site's trust boundary (docs/architecture.md): nothing in a request
reaches a trainer unchecked. A key on the wire is its field name in kebab case
(``weight_decay`` -> ``weight-decay``).

A request also names the digest of every down group (``digests``); its ``arrays``
may leave out the groups the site already holds, which the site then takes from
its cache (``fedmri.server.downlink``, ``fedmri.client.group_cache``).

A reply carries the site's update in ``arrays`` (training stages), aggregate
metrics in ``metrics``, and, when the site will not run the request, a
``status`` record with ``declined`` and a one-line ``reason``
(:func:`reply_status`); a site whose cache lacks a named group adds
:data:`MISSING_GROUPS` to that record.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmri import stages as stage_registry
from fedmri.errors import FedmriError
from fedmri.wire import ENCODER, PROJECTIONS

# Bumped whenever the content of a message changes shape; a site whose
# protocol differs from the server's declines work with a reason.
# 2: a request's ``arrays`` may leave out the down groups its ``digests`` record names
# (the site takes them from its cache); a site on 1 would decline those requests.
# 3: secure aggregation (``secagg`` requests, the ``query.secagg_*`` messages, masked replies).
PROTOCOL_VERSION = 3

# Records of a message's RecordDict.
ARRAYS_KEY = "arrays"  # ArrayRecord: the weights going down, the site's update coming up
CONFIG_KEY = "config"  # ConfigRecord: the request (TrainRequest.to_config)
METRICS_KEY = "metrics"  # MetricRecord: num-examples and the site's aggregate metrics
STATUS_KEY = "status"  # ConfigRecord of a declined request: declined, reason
VERSIONS_KEY = "versions"  # ConfigRecord answering the coordinator's query: versions and site name
DIGESTS_KEY = "digests"  # ConfigRecord of a request: down group -> fedmri.wire.group_digest, every down group
# Key of a decline's ``status`` record: the groups the request named by digest that the site's cache
# lacks; the coordinator sends that site every down group in full, in the same round (fedmri.server.downlink).
MISSING_GROUPS = "missing-groups"
# ConfigRecord of a pretraining request: how the site rebuilds a teacher group that the request
# names but does not carry (fedmri.wire.rebuild_teacher): ``<group>`` -> the digest of the teacher
# it moved from ("": a copy of the student), ``<group>.momentum`` -> the EMA momentum. A site on an
# older fedmri ignores it and answers with MISSING_GROUPS, and gets the teacher in full.
REBUILD_KEY = "rebuild"
NUM_EXAMPLES = "num-examples"  # the aggregation weight, as Flower's strategies expect
# Secure aggregation (fedmri.secagg, fedmri.client.secagg): the ConfigRecord of its messages,
# and the message types of its extra steps within a training round.
SECAGG_KEY = "secagg"
SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK = "query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"

# Site-level DP: off, local (the site clips and noises its update) or central (the coordinator does).
# distributed: each site adds its share of the noise to its update under secure aggregation.
SITE_DP_MODES = ("off", "local", "central", "distributed")
# Catalog splits a request may name.
SPLITS = ("train", "val", "test")
# How a site sends its update back: float32 values, or their difference from what it was sent
# rounded to bfloat16 (half the bytes; fedmri.wire.to_delta_record).
UPLINKS = ("float32", "bf16")
# The simulation's map from partition id to site file (never set in a deployment).
SIM_SITES_ENV = "FEDMRI_SIM_SITES"
# Federated search (a QUERY whose config says task: search): the groups a site needs to embed its
# images (the text side stays with the coordinator) and the most results one site returns.
SEARCH_TASK = "search"
SEARCH_GROUPS = (ENCODER, PROJECTIONS)
MAX_TOP_K = 1000
QUERY_KEY = "query"  # ArrayRecord of a search message: the query's text embedding, one array "embedding"
SEARCH_KEY = "search"  # ConfigRecord of a search reply: ids and scores, nothing else
# Splits a search may name: "all" is every series of the catalog.
SEARCH_SPLITS = ("all", *SPLITS)
# Search scores are cosine similarities, with room for float32 rounding.
_SCORE_BOUND = 1.0 + 1e-4


class DeclineError(FedmriError):
    """The site will not run this request; the message is the reason the coordinator sees.

    Raise it only with text written in fedmri (no paths, report text, UIDs).
    """


class RequestError(DeclineError, ValueError):
    """The server's message is malformed or does not fit this site's model."""


_MISSING = object()
_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


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


def wire_key(name: str) -> str:
    """A request field's key on the wire: ``weight_decay`` -> ``weight-decay``."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class TrainRequest:
    """One round's instructions to a site, for any stage.

    Hyperparameters that a stage does not use are ``None``; a stage's
    ``hyperparameters`` (fedmri.stages) must be present.
    """

    # A registered stage (fedmri.stages), e.g. "pretrain".
    stage: str
    # 1-based round within the stage.
    round: int
    # Global round counter of the run (for logs only).
    server_round: int
    # The run's seed; every random draw at the site derives from it.
    seed: int
    # The run's name (for logs only).
    run_name: str
    # YAML of the run's resolved FedmriConfig (see :func:`parse_run_config`).
    fedmri_config: str
    # Optimisation steps to run this round (0 for a stage that does not train).
    local_steps: int = 0
    protocol_version: int = PROTOCOL_VERSION
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
    # Secure aggregation (fedmri.secagg): the site clips its update to this L2 norm, weights it by
    # its example count capped at secagg_max_weight, encodes it at secagg_scale and masks it.
    secagg: bool = False
    secagg_clip_norm: float = 0.0
    secagg_max_weight: float = 0.0
    secagg_scale: float = 0.0
    # Distributed site-level DP: the number of sites m whose noise shares make up the sum's noise.
    site_dp_sites: int = 0
    # The coordinator's fedmri version, checked against the site's policy.fedmri_versions
    # ("" from a coordinator that does not say).
    fedmri_version: str = ""
    # How the site sends its update (:data:`UPLINKS`): "float32" values, or "bf16", the
    # difference from what it was sent rounded to bfloat16 (fedmri.wire.to_delta_record).
    # A site that does not know this key sends float32, which the coordinator reads as ever.
    uplink: str = "float32"
    # How the coordinator sends the round's up groups (the ones the site trains): "float32", or
    # "bf16", rounded to bfloat16 (uint16 bits on the wire; fedmri.wire.to_bf16_record); needs
    # the bf16 uplink, so the coordinator keeps its float32 copy.
    downlink: str = "float32"

    @property
    def trains(self) -> bool:
        """The stage sends an update back (fedmri.stages.StageSpec.trains)."""
        return stage_registry.get(self.stage).trains

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TrainRequest:
        """Parse and check a ConfigRecord's values (any mapping): the site's side of the contract.

        Raises:
            RequestError: For a missing key, a wrong type or an out-of-range value.
        """
        _check_protocol(values)
        stage = config_value(values, "stage", str)
        if stage not in stage_registry.names():
            raise RequestError(f"unknown stage {stage!r}; this site knows {', '.join(stage_registry.names())}")
        spec = stage_registry.get(stage)
        required = set(spec.hyperparameters) | ({"local_steps"} if spec.trains else set())
        parsed = {}
        for f in _fields():
            default = _MISSING if f.name in required or f.default is dataclasses.MISSING else f.default
            parsed[f.name] = config_value(values, wire_key(f.name), _KINDS[str(f.type).split("|")[0].strip()],
                                          default=default)
        req = cls(**parsed)
        req.check()
        return req

    def to_config(self) -> dict[str, Any]:
        """The ConfigRecord values of this request: every field that is set, by its wire key.

        Raises:
            RequestError: The request would not pass the site's check.
        """
        self.check()
        return {wire_key(f.name): v for f in _fields() if (v := getattr(self, f.name)) is not None}

    @classmethod
    def fields_from_config(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Field values from wire keys (a strategy's per-round keys, e.g. FedProx's ``proximal-mu``).

        Raises:
            RequestError: A key that is no request field.
        """
        names = {wire_key(f.name): f.name for f in _fields()}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise RequestError(f"{unknown[0]!r} is not a request key")
        return {names[k]: v for k, v in values.items()}

    def check(self) -> None:
        """Range checks of every value.

        Raises:
            RequestError: Naming the first value out of range.
        """
        if self.round < 1 or self.server_round < 1:
            raise RequestError(f"round {self.round} and server-round {self.server_round} must be >= 1")
        if self.trains and self.local_steps < 1:
            raise RequestError(f"local-steps {self.local_steps} must be >= 1 for stage {self.stage}")
        for name in ("lr", "weight_decay", "proximal_mu"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise RequestError(f"{wire_key(name)} {value} must be >= 0")
        if self.teacher_momentum is not None and not 0.0 <= self.teacher_momentum <= 1.0:
            raise RequestError(f"teacher-momentum {self.teacher_momentum} must be in [0, 1]")
        if self.teacher_temp is not None and not self.teacher_temp > 0.0:
            raise RequestError(f"teacher-temp {self.teacher_temp} must be > 0")
        if self.split not in SPLITS:
            raise RequestError(f"split {self.split!r} is not one of {', '.join(SPLITS)}")
        for name in ("uplink", "downlink"):
            if getattr(self, name) not in UPLINKS:
                raise RequestError(f"{name} {getattr(self, name)!r} is not one of {', '.join(UPLINKS)}")
        if self.downlink == "bf16" and self.uplink != "bf16":
            raise RequestError("downlink bf16 needs uplink bf16: the site must send its update as a difference")
        self._check_dp()

    def _check_dp(self) -> None:
        if self.stage_rounds < 1:
            raise RequestError(f"stage-rounds {self.stage_rounds} must be >= 1")
        if self.dp:
            if not self.trains:
                raise RequestError(f"dp is for training stages ({', '.join(stage_registry.names(trains=True))}), "
                                   f"not {self.stage}")
            if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
                raise RequestError("dp needs exactly one of dp-noise-multiplier and dp-target-epsilon")
            for name in ("dp_noise_multiplier", "dp_target_epsilon", "dp_max_grad_norm"):
                value = getattr(self, name)
                if value is not None and not (math.isfinite(value) and value > 0):
                    raise RequestError(f"{wire_key(name)} {value} must be a finite number > 0")
        if self.site_dp not in SITE_DP_MODES:
            raise RequestError(f"site-dp {self.site_dp!r} is not one of {', '.join(SITE_DP_MODES)}")
        if self.site_dp != "off":
            if not self.trains:
                raise RequestError(f"site-dp is for training stages ({', '.join(stage_registry.names(trains=True))}), "
                                   f"not {self.stage}")
            if not (self.site_dp_clip_norm > 0 and self.site_dp_noise_multiplier > 0):
                raise RequestError("site-dp needs site-dp-clip-norm > 0 and site-dp-noise-multiplier > 0")
        if self.secagg:
            if not self.trains:
                raise RequestError(f"secagg is for training stages, not {self.stage}")
            if self.site_dp == "central":
                raise RequestError("secagg hides each site's update, so central site-dp cannot clip it")
        if self.site_dp == "distributed" and not (self.secagg and self.site_dp_sites >= 1):
            raise RequestError("site-dp distributed needs secagg and site-dp-sites >= 1")
            if not (self.secagg_clip_norm > 0 and self.secagg_max_weight >= 1 and self.secagg_scale >= 1):
                raise RequestError("secagg needs secagg-clip-norm > 0, secagg-max-weight >= 1 and secagg-scale >= 1")


@dataclass(frozen=True)
class SearchQuery:
    """The config of a federated search message (a QUERY), built by the coordinator, checked by the site.

    The message also carries the image side's weights (``arrays``, :data:`SEARCH_GROUPS`)
    and the query's text embedding (``query``); the site checks those against its model.
    """

    # Results wanted from each site, 1..MAX_TOP_K.
    top_k: int
    # YAML of the run's resolved FedmriConfig.
    fedmri_config: str
    # Catalog split the sites search; "all" = every series.
    split: str = "all"

    def check(self) -> None:
        """Raises RequestError for a ``top_k`` outside 1..MAX_TOP_K or an unknown split."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= MAX_TOP_K:
            raise RequestError(f"top-k {self.top_k!r} must be an integer in 1..{MAX_TOP_K}")
        if self.split not in SEARCH_SPLITS:
            raise RequestError(f"split {self.split!r} is not one of {', '.join(SEARCH_SPLITS)}")

    def to_config(self) -> dict[str, Any]:
        """The message's ``config`` record, checked first as the site will check it.

        Raises:
            RequestError: The query would not pass the site's check.
        """
        self.check()
        return {"task": SEARCH_TASK, "top-k": self.top_k, "split": self.split,
                "protocol-version": PROTOCOL_VERSION, "fedmri-config": self.fedmri_config}

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SearchQuery:
        """Parse and check a search message's ``config`` record (the site's side).

        Raises:
            RequestError: Another protocol or task, a missing key, a wrong type or an out-of-range value.
        """
        _check_protocol(values)
        task = config_value(values, "task", str)
        if task != SEARCH_TASK:
            raise RequestError(f"task {task!r} is not {SEARCH_TASK!r}")
        query = cls(top_k=config_value(values, "top-k", int), fedmri_config=config_value(values, "fedmri-config", str),
                    split=config_value(values, "split", str, default="all"))
        query.check()
        return query


def search_reply(ids: list[str], scores: list[float]) -> dict[str, Any]:
    """A site's search answer, the content of its :data:`SEARCH_KEY` record."""
    return {"ids": list(ids), "scores": [float(s) for s in scores]}


def parse_search_reply(content: Any, top_k: int) -> tuple[list[str], list[float]]:
    """A site's ids and scores from a search reply's RecordDict, checked against the protocol.

    Raises:
        RequestError: Naming what is out of protocol (other records, other keys,
            wrong types, more than ``top_k`` results, scores that are not cosines).
    """
    if list(content.keys()) != [SEARCH_KEY] or SEARCH_KEY not in content.config_records:
        raise RequestError(f"records {sorted(content.keys())} instead of one {SEARCH_KEY!r} ConfigRecord")
    record = content.config_records[SEARCH_KEY]
    if sorted(record.keys()) != ["ids", "scores"]:
        raise RequestError(f"search keys {sorted(record.keys())} instead of ids and scores")
    ids, scores = list(record["ids"]), list(record["scores"])
    if not all(isinstance(i, str) for i in ids) or not all(isinstance(s, float) for s in scores):
        raise RequestError("ids must be strings and scores floats")
    if len(ids) != len(scores) or len(ids) > top_k or len(set(ids)) != len(ids):
        raise RequestError(f"{len(ids)} ids and {len(scores)} scores for top-k {top_k} (ids must be distinct)")
    if not all(math.isfinite(s) and abs(s) <= _SCORE_BOUND for s in scores):
        raise RequestError("scores must be finite cosine similarities in [-1, 1]")
    return ids, scores


def _check_protocol(values: Mapping[str, Any]) -> None:
    protocol = config_value(values, "protocol-version", int, default=PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION:
        raise RequestError(f"the server speaks protocol {protocol}, this site {PROTOCOL_VERSION}; "
                           "coordinator and site must run compatible fedmri releases")


@functools.cache
def _fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainRequest)


@functools.lru_cache(maxsize=4)
def parse_run_config(text: str) -> Any:
    """The run's config from the YAML the server sends, checked against this site's schema.

    Merged as :func:`fedmri.config.load_config` merges a user file: schema
    defaults, then the file; unknown keys and wrong types are errors (a site on
    a different fedmri version than the coordinator). Read-only; cached, since
    every round of a run sends the same text.

    Raises:
        RequestError: The text is not YAML or does not fit the schema.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fedmri.config.schema import FedmriConfig

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
    return cfg


def reply_status(content: Any) -> tuple[bool, str]:
    """(declined, reason) of a reply's RecordDict: the site's decline (client.replies.decline)."""
    status = content.config_records.get(STATUS_KEY)
    if status is not None and status.get("declined"):
        return True, str(status.get("reason", "declined"))
    return False, ""
