"""The Flower ClientApp that runs at each hospital.

It answers ``query`` with the versions it runs and the site's name, ``train`` with one round of
the stage trainer (pretrain, align) and ``evaluate`` with metrics of the
global model. The site file comes from the SuperNode's node config
(``site-config``) or, in simulation, from the local JSON map that
``FEDMRI_SIM_SITES`` names (partition id -> site file): never from the server.

The down groups a request leaves out, naming them by digest, come from the site's
cache (:mod:`fedmri.client.group_cache`); a site whose cache lacks one declines with
``status.missing-groups`` and the coordinator sends every group in the same round.

A request the site will not run gets a decline: ``num-examples`` 0,
``declined`` 1 and a one-line ``status.reason``. An unexpected exception in a
trainer is logged here with its traceback and declined with a generic reason
naming only the exception type. Flower 1.42 would otherwise turn it into an
error reply carrying ``str(exception)`` to the server, and such text can hold
catalog paths or series pseudonyms; the SuperNode keeps serving either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmri import __version__, trace
from fedmri import stages as stage_registry
from fedmri.client.group_cache import GroupCache, MissingGroupsError, resolve_down
from fedmri.client.journal import note_round
from fedmri.client.policy import allowed_metrics, check_request
from fedmri.client.privacy.dp_sgd import noise_generator
from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.privacy.site_dp import privatize_update
from fedmri.client.replies import decline
from fedmri.client.site import load_site
from fedmri.client.trainers import DeclineError, RequestError, TrainRequest, configure_torch, parse_run_config
from fedmri.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DIGESTS_KEY,
    METRICS_KEY,
    MISSING_GROUPS,
    NUM_EXAMPLES,
    PROTOCOL_VERSION,
    REBUILD_KEY,
    SEARCH_TASK,
    SIM_SITES_ENV,
    STATUS_KEY,
    VERSIONS_KEY,
)
from fedmri.wire import from_record, group_digests, groups_in, to_delta_record, to_record

def _guarded(msg: Message, context: Context, call_next: Any) -> Message:
    """Decline every message in a ClientApp process that fedmri's launcher did not start (guard.unguarded_reason)."""
    from fedmri.client.guard import unguarded_reason

    reason = unguarded_reason()
    if reason is not None:
        log.error("declined a %s message: %s", msg.metadata.message_type, reason)
        return decline(msg, reason)
    return call_next(msg, context)


app = ClientApp(mods=[_guarded])
log = logging.getLogger(__name__)
trace.event("clientapp-imported", started=trace.process_started())


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this site's software versions and, when it has a site file, its name; nothing about its data.

    A query whose ``config`` record has ``task: search`` is a federated search instead
    (:func:`fedmri.client.search.handle_search`): pseudonymous series ids and scores only.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is not None and config.get("task") == SEARCH_TASK:
        return _search(msg, context)
    reply = ConfigRecord({"fedmri_version": __version__, "protocol_version": PROTOCOL_VERSION})
    try:
        reply["site_name"] = str(load_site(_site_file(context)).name)
    except Exception:  # noqa: BLE001 -- the coordinator then names the site by its node id
        log.warning("no site name for the coordinator's query", exc_info=True)
    return Message(RecordDict({VERSIONS_KEY: reply}), reply_to=msg)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: this round's public keys (:mod:`fedmri.client.secagg`)."""
    return _secagg_step(msg, context, "handle_keys")


@app.query("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 2: encrypted shares of this site's secrets for its neighbours."""
    return _secagg_step(msg, context, "handle_shares")


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 4: the shares that remove the masks of the sum, once per round."""
    return _secagg_step(msg, context, "handle_unmask")


def _secagg_step(msg: Message, context: Context, step: str) -> Message:
    from fedmri.client import secagg

    try:
        return getattr(secagg, step)(msg, context)
    except DeclineError as exc:
        log.warning("declined secure aggregation %s: %s", step, exc)
        return decline(msg, str(exc))
    except Exception as exc:  # noqa: BLE001 -- see the module docstring
        log.exception("secure aggregation %s failed at this site", step)
        return decline(msg, f"secure aggregation failed at the site ({type(exc).__name__}); the site's log has "
                            "the details")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training: the stage's up groups and aggregate metrics."""
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global model on one of the site's splits; no weights."""
    return _handle(msg, context)


def _search(msg: Message, context: Context) -> Message:
    from fedmri.client.search import handle_search

    try:
        site = load_site(_site_file(context))
    except DeclineError as exc:
        return decline(msg, str(exc))
    except Exception as exc:  # noqa: BLE001 -- see the module docstring
        log.exception("search: the site file cannot be read")
        return decline(msg, f"search failed at the site ({type(exc).__name__}); the site's log has the details")
    return handle_search(msg, context, site)


def _site_file(context: Context) -> str:
    if "site-config" in context.node_config:
        return str(context.node_config["site-config"])
    mapping, partition = os.environ.get(SIM_SITES_ENV), context.node_config.get("partition-id")
    if not mapping or partition is None:
        raise DeclineError("this SuperNode has no 'site-config' in its node config")
    with open(mapping, encoding="utf-8") as fh:
        sites = json.load(fh)
    if str(partition) not in sites:
        raise DeclineError(f"simulated partition {partition} has no site file in {SIM_SITES_ENV}")
    return str(sites[str(partition)])


def _handle(msg: Message, context: Context) -> Message:
    start, stage = time.perf_counter(), "request"
    site, request = None, None
    trace.event("handler-start", node=int(context.node_id))

    def note(result: str, reason: str | None = None, examples: float | None = None) -> None:
        if site is not None:  # the site's own journal (fedmri client status); nothing of it is sent
            note_round(site, request, result, reason, time.perf_counter() - start, examples)

    try:
        if CONFIG_KEY not in msg.content or ARRAYS_KEY not in msg.content:
            raise RequestError(f"the message lacks its {CONFIG_KEY!r} or {ARRAYS_KEY!r} record")
        request = TrainRequest.from_config(msg.content[CONFIG_KEY])
        stage, spec = request.stage, stage_registry.get(request.stage)
        if msg.metadata.message_type != spec.message_type:
            raise RequestError(f"stage {stage!r} came as a {msg.metadata.message_type!r} message")
        site = load_site(_site_file(context))
        configure_torch(site)
        reason = check_request(site, request)
        if reason is not None:
            raise DeclineError(reason)
        run_cfg = parse_run_config(request.fedmri_config)
        arrays = msg.content[ARRAYS_KEY]
        down = spec.groups(run_cfg).down
        records = msg.content.config_records
        try:
            received = from_record(arrays, bf16=request.downlink == "bf16")
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        state = resolve_down(received, records.get(DIGESTS_KEY), down, GroupCache.of_site(site),
                             records.get(REBUILD_KEY))
        if sorted(groups_in(state)) != sorted(down):
            raise RequestError(f"{stage} expects groups {list(down)}, got {groups_in(state)}")
        trace.event("handler-inputs", node=int(context.node_id))
        up, metrics = _train(site, run_cfg, state, request, msg)
        trace.event("handler-trained", node=int(context.node_id))
        if request.secagg:  # only masked ring elements leave: the coordinator can read the sum alone
            from fedmri.client.secagg import mask_update

            masked = mask_update(context, msg, request, up, state, float(metrics[NUM_EXAMPLES]))
    except MissingGroupsError as exc:
        log.info("%s: %s", stage, exc)
        note("declined", str(exc))
        reply = decline(msg, str(exc))
        reply.content[STATUS_KEY][MISSING_GROUPS] = exc.groups
        return reply
    except DeclineError as exc:
        log.warning("declined %s: %s", stage, exc)
        note("declined", str(exc))
        return decline(msg, str(exc))
    except Exception as exc:  # noqa: BLE001 -- a site bug must not leak its message; see the module docstring
        log.exception("%s failed at this site", stage)
        note("failed", f"{type(exc).__name__}: {exc}")  # the journal stays at the site: the full message is fine
        return decline(msg, f"{stage} failed at the site ({type(exc).__name__}); the site's log has the details")
    note("ok", examples=float(metrics.get(NUM_EXAMPLES, 0.0)))
    metrics = allowed_metrics(site, metrics)
    content = RecordDict()
    sent = 0
    if spec.trains:
        if request.secagg:
            content[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in masked.items()})
        elif request.uplink == "bf16":  # the difference from what it was sent, half the bytes
            content[ARRAYS_KEY] = to_delta_record(up, state)
        else:
            content[ARRAYS_KEY] = to_record(up)
        sent = content[ARRAYS_KEY].count_bytes()
    content[METRICS_KEY] = MetricRecord({**metrics, "wall-time-s": time.perf_counter() - start,
                                       "bytes-received": arrays.count_bytes(), "bytes-sent": sent})
    trace.event("handler-end", node=int(context.node_id), bytes_sent=sent)
    return Message(content, reply_to=msg)


def _inputs_digest(msg: Message, state: dict) -> str:
    """SHA-256 of the request's config and down groups: what a retry of the same round repeats exactly,
    whichever groups came from the site's cache."""
    h = hashlib.sha256()
    for key, value in sorted(msg.content[CONFIG_KEY].items()):
        h.update(f"{key}={value!r}\x1f".encode())
    for group, digest in sorted(group_digests(state).items()):
        h.update(f"{group}={digest}\x1f".encode())
    return h.hexdigest()


def _train(site: Any, run_cfg: Any, state: dict, request: TrainRequest, msg: Message) -> tuple[dict, dict[str, float]]:
    """One training round, with the site's privacy mechanisms planned, applied and recorded.

    The ledger row is written after training and before the update leaves: a
    round that fails in between spent nothing, since nothing was released.
    """
    site_dp = request.site_dp in ("local", "distributed")  # distributed: noised in secagg.mask_update
    private = request.dp or site_dp
    # Only the ledger needs the digest: hashing every tensor is skipped for rounds without DP.
    gate = PrivacyGate(site, request, inputs=_inputs_digest(msg, state)) if private else None
    site_level = gate.plan_site_level() if site_dp else None  # declines over budget
    up, metrics = stage_registry.get(request.stage).train(site, run_cfg, state, request, privacy=gate)
    if gate is None:
        return up, metrics
    if request.dp and request.stage not in gate.plans:
        raise RuntimeError(f"the {request.stage} trainer ran without planning its DP-SGD mechanism")
    if site_level is not None and request.site_dp == "local":
        up, norm = privatize_update(state, up, site_level.max_grad_norm, site_level.noise_multiplier,
                                    noise_generator(site_level.seed, torch.device("cpu")))
        log.info("site-level DP: update norm %.3g clipped to %.3g", norm, site_level.max_grad_norm)
    return up, metrics | gate.metrics(gate.record())

