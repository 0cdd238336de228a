"""The coordinator's staged pipeline: rounds of pretrain -> align -> heads -> evaluate.

Plain Python over a Flower ``Grid`` (:class:`~fedmri.server.exchange.GridLike`),
so tests drive it in-process and the ServerApp only reads its context and calls
:meth:`Pipeline.run_all`.

Per round: sample sites, send the stage's down groups and the round's
hyperparameters (schedules evaluated here), then take the replies one by one as
they arrive (:func:`~fedmri.server.exchange.exchange`): record declines and
failures, check each update and store it in bounded memory
(:class:`~fedmri.strategies.updates.RoundUpdates`), and release the reply. After
the last reply: the round's norm bound, the aggregate of the accepted updates
(strategies), the server-side teacher, metrics and a checkpoint. A round with
fewer than ``min_sites`` useful replies leaves the weights as they were; the run
goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf

from fedmri import stages as stage_registry
from fedmri import __version__, trace, wire
from fedmri.errors import FedmriError, InputError
from fedmri.metrics import aggregate_metrics
from fedmri.secagg import SecAggError, quantisation_bound
from fedmri.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROTOCOL_VERSION,
    VERSIONS_KEY,
    TrainRequest,
)
from fedmri.server.checkpoint import load_checkpoint, save_checkpoint
from fedmri.server.config import dp_request, load_federation, run_config
from fedmri.server.downlink import Downlink
from fedmri.server.exchange import GridLike, ReplyBook, exchange, node_of
from fedmri.server.privacy_report import model_card_privacy, privacy_summary
from fedmri.server.recorder import Recorder, RoundOutcome
from fedmri.server.rundir import RunDir
from fedmri.server.secagg import SecureRound, secure_round
from fedmri.server.watch import RoundProgress
from fedmri.strategies import build_aggregator
from fedmri.strategies.secagg import SecureSum
from fedmri.strategies.site_dp import CentralSiteDP, DistributedSiteDP, run_central_epsilon
from fedmri.strategies.updates import RoundUpdates, memory_bytes_from_mb


class SiteRegistry:
    """The sites the coordinator has met: node id -> site name, and whether they speak this protocol."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.incompatible: set[int] = set()

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def compatible(self) -> dict[int, str]:
        """node -> name of every site that speaks this protocol."""
        return {n: s for n, s in self.names.items() if n not in self.incompatible}

    def identify(self, grid: GridLike, nodes: Iterable[int]) -> None:
        """Ask new sites for their versions and site name; leave out other protocol versions."""
        new = [n for n in nodes if n not in self.names]
        if not new:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(messages, timeout=60.0):
            node = node_of(reply, messages)
            if reply.has_error():
                log(WARNING, "fedmri: site %s did not say who it is: %s", node, reply.error.reason)
                continue
            info = reply.content.config_records.get(VERSIONS_KEY, {})
            if int(info.get("protocol_version", -1)) != PROTOCOL_VERSION:
                log(WARNING, "fedmri: site %s speaks protocol %s, this server %s; it is left out", node,
                    info.get("protocol_version"), PROTOCOL_VERSION)
                self.names[node] = f"node-{node}"
                self.incompatible.add(node)
                continue
            self.names[node] = str(info.get("site_name") or f"node-{node}")
            log(INFO, "fedmri: site %s is %r, fedmri %s", node, self.names[node], info.get("fedmri_version"))


def _nbytes(record: ArrayRecord) -> int:
    """The bytes of the record's arrays, from their shapes (without deserialising them)."""
    return int(sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize for array in record.values()))


def checkpoint_mismatch(state: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """What keeps a checkpoint's ``state`` from fitting the run's config; "" if nothing.

    ``expected`` is the config's initial state. Names the first key missing, unexpected or of
    another shape. A missing ``head.trunk`` is a run started before the heads shared a trunk
    (``heads.trunk_dim``, 2026-12-07): its federation.yaml needs ``heads.trunk_dim=0`` among its
    overrides to resume.
    """
    from fedmri.heads.tasks import TRUNK

    def more(keys: list[str]) -> str:
        return f" and {len(keys) - 1} more" if len(keys) > 1 else ""

    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        hint = ("; a run from before the heads shared a trunk resumes with heads.trunk_dim=0 in its overrides"
                if wire.group_of(missing[0]) == f"{wire.HEAD_PREFIX}{TRUNK}" else "")
        return f"it lacks {missing[0]}{more(missing)}{hint}"
    if extra:
        return f"it has {extra[0]}{more(extra)}, which this config does not"
    for key in expected:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            return f"{key} is {tuple(state[key].shape)} there, {tuple(expected[key].shape)} here"
    return ""


class Pipeline:
    """Runs a federation config's stages over a grid, checkpointing every round.

    Args:
        fed: A federation config from :func:`fedmri.server.config.load_federation`.
        run_dir: The run folder; default ``<fed.run_root>/<fed.name>``.
        train_sites: Only sites with these names train (baselines: one site
            alone, the pooled site); default every connected site.
        eval_sites: Only sites with these names evaluate; default every connected site.
        init_state: Start from these global tensors instead of a fresh model
            (evaluating a model trained elsewhere).
        on_round_end: Called with each round's :class:`RoundOutcome` after its checkpoint
            (progress displays, benchmarks; an exception raised there stops the run as a
            kill after that checkpoint would).
    """

    def __init__(self, fed: DictConfig, run_dir: str | Path | None = None, *, train_sites: list[str] | None = None,
                 eval_sites: list[str] | None = None, init_state: dict[str, torch.Tensor] | None = None,
                 on_round_end: Callable[[RoundOutcome], None] | None = None) -> None:
        self.fed = fed
        self.cfg = run_config(fed)
        self.run = RunDir(run_dir or Path(fed.run_root) / fed.name)
        self.aggregators = [_aggregator(s, build_aggregator(OmegaConf.to_container(s.strategy, resolve=True)))
                            for s in fed.stages]
        self.state: dict[str, torch.Tensor] = {}
        self.rng = np.random.default_rng(int(fed.seed))
        self.sites_seen: set[str] = set()
        self.outcomes: list[RoundOutcome] = []
        self.train_sites = None if train_sites is None else set(train_sites)
        self.eval_sites = None if eval_sites is None else set(eval_sites)
        self.init_state = init_state
        self.sites = SiteRegistry()
        self.downlink = Downlink(enabled=bool(fed.group_cache))
        self.recorder = Recorder(self.run, self.site)
        self.on_round_end = on_round_end

    # ----------------------------------------------------------------- set-up
    def _start_or_resume(self) -> tuple[int, int, int]:
        """(stage index, next round in that stage, global rounds done)."""
        self.run.write_configs(self.fed, self.cfg)
        for stale in self.run.path.glob("updates-*"):  # a killed round's spilled updates
            shutil.rmtree(stale, ignore_errors=True)
        ckpt = load_checkpoint(self.run.ckpt) if self.fed.resume else None
        before = self.run.read_state().get("started_at") if ckpt is not None else None
        self.started_at = float(before) if isinstance(before, (int, float)) else time.time()
        if ckpt is None:
            if self.fed.resume:
                log(WARNING, "fedmri: --resume given but %s has no checkpoint; starting from round 1", self.run.ckpt)
            if self.run.metrics_path.exists():
                self.run.metrics_path.unlink()
            self._open_tracking(None)
            self.state = wire.initial_state(self.cfg)
            if self.init_state is not None:
                unknown = set(self.init_state) - set(self.state)
                if unknown:
                    raise FedmriError(f"initial state has keys this encoder config lacks, e.g. {sorted(unknown)[0]}")
                self.state.update({k: v.clone() for k, v in self.init_state.items()})
            return 0, 1, 0
        state, strategy_arrays, meta = ckpt
        mismatch = checkpoint_mismatch(state, wire.initial_state(self.cfg))
        if mismatch:
            raise FedmriError(f"checkpoint in {self.run.ckpt} was made with another encoder config ({mismatch}); "
                              "resume with the run's own federation.yaml or start a new run name")
        self.state = state
        self.rng.bit_generator.state = meta["rng"]
        self.recorder.history = meta.get("history", [])
        self.sites_seen = set(meta.get("sites_seen", []))
        for i, agg in enumerate(self.aggregators):
            arrays = {k.split("/", 1)[1]: v for k, v in strategy_arrays.items() if k.startswith(f"{i}/")}
            agg.load_state_dict(arrays, meta["strategies"][i])
        self.run.truncate_metrics_after(meta["server_round"])
        self._open_tracking(meta["server_round"])
        stage_i, rnd = meta["stage_index"], meta["round"] + 1
        if rnd > self.fed.stages[stage_i].rounds:
            stage_i, rnd = stage_i + 1, 1
        log(INFO, "fedmri: resuming %s after global round %d", self.fed.name, meta["server_round"])
        return stage_i, rnd, meta["server_round"]

    def _open_tracking(self, resume_after: int | None) -> None:
        """The trackers that get the rows (fedmri.server.tracking); a resume hides the steps after its checkpoint."""
        from fedmri.server.tracking import MLflowSink, TensorBoardSink

        self.recorder.close()
        self.recorder.sinks = []
        tracking = self.fed.get("tracking") or {}
        if tracking.get("tensorboard", False):
            self.recorder.sinks.append(TensorBoardSink(self.run.path, resume_after))
        mlflow = tracking.get("mlflow") or {}
        if mlflow.get("enabled", False):
            params = {"federation": OmegaConf.to_container(self.fed, resolve=True),
                      "config": OmegaConf.to_container(self.cfg, resolve=True)}
            self.recorder.sinks.append(MLflowSink(self.run.path, str(self.fed.name), params, mlflow.get("uri"),
                                                  mlflow.get("experiment"), resume_after=resume_after))

    def _eligible(self, nodes: list[int], stage_i: int) -> list[int]:
        compatible = self.sites.compatible()
        ok = [n for n in nodes if n in compatible]
        only = self.train_sites if self._spec(stage_i).trains else self.eval_sites
        if only is not None:
            ok = [n for n in ok if compatible[n] in only]
        return ok

    def site(self, node: int) -> str:
        return self.sites.name(node)

    def _wait_for_sites(self, grid: GridLike, stage_i: int) -> list[int]:
        need = self._min_sites(stage_i)
        deadline = time.monotonic() + float(self.fed.wait_for_sites_s)
        last = -1
        while True:
            self.sites.identify(grid, sorted(int(n) for n in grid.get_node_ids()))
            nodes = self._eligible(sorted(int(n) for n in grid.get_node_ids()), stage_i)
            if len(nodes) >= need:
                return nodes
            if len(nodes) != last:
                log(INFO, "fedmri: %d of %d sites connected; waiting", len(nodes), need)
                last = len(nodes)
            if time.monotonic() > deadline:
                raise FedmriError(f"only {len(nodes)} of min_sites={need} eligible sites connected within "
                                  f"{self.fed.wait_for_sites_s:.0f} s; start more site daemons or lower min_sites")
            time.sleep(1.0)

    # ------------------------------------------------------------------ rounds
    def round_request(self, stage_i: int, rnd: int, server_round: int) -> TrainRequest:
        """The round's request to every sampled site (fedmri.protocol)."""
        stage = self.fed.stages[stage_i]
        # Each round runs at the schedule's value for its middle: round 1 of a
        # warm-up would otherwise train at a learning rate of exactly 0.
        fraction = (rnd - 0.5) / stage.rounds
        spec = self._spec(stage_i)
        fields: dict[str, Any] = {}
        if spec.round_values is not None:
            earlier = [stage_registry.get(s.name) for s in self.fed.stages[:stage_i]]
            fields |= spec.round_values(stage_registry.RoundInputs(self.cfg, stage, fraction, earlier))
        if spec.trains:
            fields |= dp_request(stage)
        fields |= TrainRequest.fields_from_config(self.aggregators[stage_i].client_config())
        if spec.trains and not stage.secure_aggregation.enabled:  # masked integers have their own encoding
            fields |= {"uplink": str(self.fed.uplink), "downlink": str(self.fed.downlink)}
        return TrainRequest(stage=stage.name, round=rnd, server_round=server_round, seed=int(self.fed.seed),
                            run_name=str(self.fed.name), fedmri_config=OmegaConf.to_yaml(self.cfg),
                            local_steps=int(stage.local_steps), stage_rounds=int(stage.rounds),
                            fedmri_version=__version__, **fields)

    def _unmask(self, grid: GridLike, stage_i: int, secure: SecureRound, total: SecureSum, updates: RoundUpdates,
                metrics_by_node: dict[int, dict[str, float]],
                out: RoundOutcome) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
        """The masks off the round's sum; its mean becomes the round's one update. Returns the metrics of
        the sites whose input counted (none when the sum cannot be recovered: the weights then stay)
        and the round's secure aggregation metrics."""
        stage = self.fed.stages[stage_i]
        if len(total.sent) < self._min_sites(stage_i):  # unmasking never starts: no new problems
            return {}, {}
        try:
            secure.unmask(grid, total)
            mean, weight = total.mean(secure.scale)
            expected = sum(round(min(metrics_by_node[n][NUM_EXAMPLES], secure.max_weight)) for n in total.sent)
            if weight != expected:
                raise SecAggError(f"secure aggregation: the unmasked weight {weight} is not the sites' {expected}")
        except SecAggError as exc:
            log(WARNING, "fedmri: %s round: %s; weights unchanged", stage.name, exc)
            out.problems += [(n, "failed", str(exc)) for n in total.sent]
            return {}, {}
        finally:
            out.problems += [p for p in secure.problems if p not in out.problems]
        current = updates.current
        updates.add(0, {k: (current[k].astype(np.float64) + mean[k]).astype(current[k].dtype) for k in mean},
                    MetricRecord({NUM_EXAMPLES: weight}))
        bound = quantisation_bound(len(secure.nodes), secure.scale, weight)
        return ({n: m for n, m in metrics_by_node.items() if n in total.sent},
                {"secagg-sites": float(len(total.sent)), "secagg-quantisation-bound": bound})

    def _spec(self, stage_i: int) -> stage_registry.StageSpec:
        return stage_registry.get(self.fed.stages[stage_i].name)

    def _site_rate(self, stage_i: int) -> float:
        """The rate each site is drawn with under site-level DP (1.0 without sampling)."""
        stage = self.fed.stages[stage_i]
        fraction = stage.fraction if stage.fraction is not None else self.fed.fraction
        return float(fraction) if stage.site_dp.mode in ("central", "distributed") and fraction < 1 else 1.0

    def _sample(self, nodes: list[int], stage_i: int) -> list[int]:
        stage = self.fed.stages[stage_i]
        fraction = stage.fraction if stage.fraction is not None else self.fed.fraction
        rate = self._site_rate(stage_i)
        if rate < 1.0:
            # Site-level DP's amplification by sampling holds when each site is drawn on its own
            # with probability q (Poisson), as its accountant assumes: no minimum is topped up.
            return sorted(int(n) for n, u in zip(nodes, self.rng.random(len(nodes)), strict=True) if u < rate)
        k = min(len(nodes), max(self._min_sites(stage_i), math.ceil(fraction * len(nodes))))
        if k == len(nodes):
            return nodes
        return sorted(int(n) for n in self.rng.choice(nodes, size=k, replace=False))

    def _min_sites(self, stage_i: int) -> int:
        m = self.fed.stages[stage_i].min_sites
        return int(m if m is not None else self.fed.min_sites)

    def run_round(self, grid: GridLike, stage_i: int, rnd: int, server_round: int) -> RoundOutcome:
        started = time.perf_counter()
        stage, spec = self.fed.stages[stage_i], self._spec(stage_i)
        groups = spec.groups(self.cfg)
        nodes = self._wait_for_sites(grid, stage_i)
        self.sites_seen.update(self.site(n) for n in nodes)
        sampled = self._sample(nodes, stage_i)
        out = RoundOutcome(stage.name, rnd, server_round, sampled)
        request = self.round_request(stage_i, rnd, server_round)
        trace.event("round-start", stage=stage.name, round=rnd)
        secure, training = None, sampled
        if spec.trains and stage.secure_aggregation.enabled:
            # Keys and shares first (server/secagg.py): only the sites that shared theirs train.
            secure = secure_round(stage, f"{self.fed.name}/{server_round}", sampled,
                                  int(self.rng.integers(2**31)), float(self.fed.round_timeout_s))
            sites = len(sampled) if stage.site_dp.mode == "distributed" else 0  # whose noise shares sum up
            request = dataclasses.replace(request, secagg=True, secagg_scale=secure.scale,
                                          secagg_clip_norm=float(stage.secure_aggregation.clip_norm),
                                          secagg_max_weight=secure.max_weight, site_dp_sites=sites)
            try:
                training = secure.setup(grid)
            except SecAggError as exc:
                log(WARNING, "fedmri: %s round %d: %s", stage.name, rnd, exc)
                training = []
        rounded = groups.up if request.downlink == "bf16" else ()
        for group in groups.rebuilt if rounded else ():  # an unmoved teacher: the copy of what the sites get
            wire.round_teacher_copy(self.state, group)
        # Each site gets the down groups it has not acknowledged (server/downlink.py).
        downlink = self.downlink.start(self.state, groups.down, ConfigRecord(request.to_config()),
                                       spec.message_type, training, self.site,
                                       extras=secure.extras if secure is not None else None, cached=groups.kept,
                                       rebuilt=groups.rebuilt, rounded=rounded)
        messages, down_bytes = downlink.messages, max(downlink.bytes_sent.values(), default=0)
        out.bytes_down_by_node = downlink.bytes_sent  # the same dict: a resend adds to it
        grid = downlink.bound(grid)  # a site that lacks a group it acknowledged gets every group again
        trace.event("messages-built", stage=stage.name, round=rnd, bytes=down_bytes)
        log(INFO, "fedmri: %s round %d/%d (global %d): %d sites, %.1f MB down each", stage.name, rnd,
            stage.rounds, server_round, len(sampled), down_bytes / 1e6)
        t0 = time.monotonic()
        book = ReplyBook(messages, float(self.fed.round_timeout_s))
        progress = RoundProgress(self.run.write_progress, stage.name, rnd, stage.rounds, server_round,
                                 [self.site(n) for n in training])
        # Training replies are checked, stored and released one by one (strategies.updates): the
        # coordinator never holds a round's replies at once.
        current = wire.to_record(wire.select(self.state, groups.up)) if spec.trains else None
        updates = (RoundUpdates(current, memory_bytes=memory_bytes_from_mb(float(self.fed.update_memory_mb)),
                                spill_dir=self.run.path, bf16_deltas=request.uplink == "bf16")
                   if current is not None else None)
        total = (SecureSum({k: tuple(a.shape) for k, a in current.items()}, secure.context)
                 if secure is not None and current is not None else None)
        masked_rejects: dict[int, str] = {}
        secure_metrics: dict[str, float] = {}
        with contextlib.ExitStack() as cleanup:
            if updates is not None:
                cleanup.callback(updates.close)
            metrics_by_node: dict[int, dict[str, float]] = {}
            for reply in exchange(grid, messages, float(self.fed.round_timeout_s)):
                node = book.take(reply)
                if node is None:
                    problem_node, status, reason = book.problems[-1]
                    progress.mark(self.site(problem_node), status, reason)
                    continue
                progress.mark(self.site(node), "replied")
                up = reply.content.array_records.get(ARRAYS_KEY)
                nbytes = _nbytes(up) if up is not None else 0
                if total is not None:  # masked: into the running sum, nothing of the site's own kept
                    reason = total.add(node, {k: a.numpy() for k, a in up.items()}) if up is not None else "no arrays"
                    if reason is not None:
                        log(WARNING, "Rejected the masked update of site %s: %s", node, reason)
                        masked_rejects[node] = reason
                        continue
                elif updates is not None:
                    t = time.perf_counter()
                    reason = updates.offer(reply)
                    out.timings["validate"] = out.timings.get("validate", 0.0) + time.perf_counter() - t
                    trace.event("offered", node=node, seconds=time.perf_counter() - t)
                    if reason is not None:
                        log(WARNING, "Rejected the update of site %s: %s", node, reason)
                        continue
                metrics = reply.content.metric_records.get(METRICS_KEY, {})
                metrics_by_node[node] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                out.replies.append((node, metrics_by_node[node], nbytes))
                del reply, up
            wall = time.monotonic() - t0
            out.bytes_down, out.wall_s, out.replied_at = down_bytes, wall, time.time()
            out.problems = book.finish() + (secure.problems if secure is not None else [])
            out.problems += [(node, "rejected", reason) for node, reason in masked_rejects.items()]
            if total is not None and secure is not None and updates is not None:
                metrics_by_node, secure_metrics = self._unmask(grid, stage_i, secure, total, updates,
                                                               metrics_by_node, out)
            elif updates is not None:
                # Under central site DP, clipping bounds each site; rejecting relative to the other
                # sites' norms would let one site's data decide whether another site counts.
                factor = math.inf if stage.site_dp.mode == "central" else float(self.fed.norm_bound_factor)
                for node, reason in updates.reject_outliers(factor).items():
                    log(WARNING, "Rejected the update of site %s: %s", node, reason)
                out.problems += [(node, "rejected", reason) for node, reason in updates.rejected.items()]
                out.updates_in_memory, out.updates_spilled = updates.peak_count, updates.spilled
                metrics_by_node = {n: m for n, m in metrics_by_node.items() if n not in updates.rejected}
                out.replies = [r for r in out.replies if r[0] not in updates.rejected]
            out.accepted = sorted(metrics_by_node)
            # An evaluation is worth recording from any site that had data for it;
            # an update needs min_sites contributors.
            need = self._min_sites(stage_i) if spec.trains else 1
            if len(metrics_by_node) >= need:
                out.aggregated = aggregate_metrics(list(metrics_by_node.values())) | secure_metrics
                if updates is not None and current is not None:
                    t = time.perf_counter()
                    if stage.site_dp.mode == "central":  # a fixed denominator: who replied does not set the noise
                        self.aggregators[stage_i].expected_sites = self._site_rate(stage_i) * len(nodes)
                    new, own = self.aggregators[stage_i].aggregate(server_round, current, updates)
                    out.timings["aggregate"] = time.perf_counter() - t
                    self.state.update(wire.from_record(new))
                    # The sites' metrics are averaged above; keep what the aggregator adds of its own
                    # (central site DP's noise std and clip count).
                    reported = {k for m in metrics_by_node.values() for k in m}
                    out.aggregated |= {k: float(v) for k, v in own.items() if k not in reported}
                    if spec.after_aggregate is not None:
                        momentum = spec.after_aggregate(self.state, request, stage)
                        if groups.rebuilt:  # the sites rebuild the moved teacher themselves next round
                            self.downlink.moved(downlink, momentum)
                    out.updated = True
                    if stage.site_dp.mode == "distributed":  # noise that arrived: z sqrt(m'/m)
                        z_eff = self.aggregators[stage_i].account(self._site_rate(stage_i), len(metrics_by_node),
                                                                  len(sampled))
                        out.aggregated |= {"site-dp-noise-multiplier": z_eff, "site-dp-distributed": 1.0}
                    elif stage.site_dp.mode == "central":
                        self.aggregators[stage_i].account(self._site_rate(stage_i))
                    if stage.site_dp.mode in ("central", "distributed"):
                        delta = float(stage.site_dp.delta)
                        out.aggregated |= {"site-dp-epsilon": run_central_epsilon(self.aggregators, delta),
                                           "site-dp-delta": delta}
            else:
                log(WARNING, "fedmri: %s round %d had %d useful replies, fewer than %d; %s", stage.name, rnd,
                    len(metrics_by_node), need, "weights unchanged" if spec.trains else "nothing to report")
        trace.event("round-done", stage=stage.name, round=rnd)
        progress.finish([(self.site(node), status, reason) for node, status, reason in out.problems])
        self.recorder.record(out)
        shown = {k: v for k, v in out.aggregated.items() if k.endswith("loss") or k in ("t2i_r5", "i2t_r5")}
        log(INFO, "fedmri: %s round %d/%d done in %.0f s: %s%s", stage.name, rnd, stage.rounds, wall,
            ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())) or "no metrics",
            f" ({len(out.accepted)} sites" + (f", {len(out.declined)} declined" if out.declined else "")
            + (f", {len(out.failed)} failed" if out.failed else "")
            + (f", {len(out.rejected)} rejected" if out.rejected else "") + ")")
        out.timings["round"] = time.perf_counter() - started
        return out

    # ------------------------------------------------------------------- main
    def run_all(self, grid: GridLike) -> dict[str, Any]:
        """Run every remaining round; returns the final results (also in results.json)."""
        stage_i, rnd, server_round = self._start_or_resume()
        while stage_i < len(self.fed.stages):
            stage = self.fed.stages[stage_i]
            server_round += 1
            self.run.write_state(name=self.fed.name, status="running", started_at=self.started_at,
                                 stage=stage.name, round=rnd,
                                 rounds=stage.rounds, server_round=server_round, sites_seen=sorted(self.sites_seen),
                                 last_metrics=self.history[-1] if self.history else {})
            outcome = self.run_round(grid, stage_i, rnd, server_round)  # recorded, history included
            self.outcomes.append(outcome)
            t = time.perf_counter()
            self._checkpoint(stage_i, rnd, server_round)
            outcome.timings["checkpoint"] = time.perf_counter() - t
            if self.on_round_end is not None:
                self.on_round_end(outcome)
            rnd += 1
            if rnd > stage.rounds:
                stage_i, rnd = stage_i + 1, 1
        return self._finish()

    def _checkpoint(self, stage_i: int, rnd: int, server_round: int) -> None:
        arrays: dict[str, np.ndarray] = {}
        scalars = []
        for i, agg in enumerate(self.aggregators):
            a, s = agg.state_dict()
            arrays |= {f"{i}/{k}": v for k, v in a.items()}
            scalars.append(s)
        meta = {"stage_index": stage_i, "stage": self.fed.stages[stage_i].name, "round": rnd,
                "rng": self.rng.bit_generator.state, "strategies": scalars, "history": self.history,
                "sites_seen": sorted(self.sites_seen)}
        save_checkpoint(self.run.ckpt, server_round, self.state, arrays, meta, keep=int(self.fed.keep_checkpoints))

    @property
    def history(self) -> list[dict[str, Any]]:
        """The rounds so far, as the checkpoint keeps them (:class:`~fedmri.server.recorder.Recorder`)."""
        return self.recorder.history

    def _finish(self) -> dict[str, Any]:
        results = self.recorder.finish(self.fed.name, sorted(self.sites_seen))
        if self.fed.export:
            self.export(self.run.path / "encoder")
        self.recorder.finish_tracking()  # the reports and the model card, now that all are written
        self.run.write_state(name=self.fed.name, status="finished", started_at=self.started_at, stage=None, round=None,
                             server_round=len(self.history), sites_seen=sorted(self.sites_seen),
                             last_metrics=self.history[-1] if self.history else {})
        return results

    def export(self, out: Path) -> Path:
        """Save this run's encoder with its model card (:func:`export_encoder`)."""
        return export_encoder(self.fed, self.state, self.history, self.sites_seen, self.run.read_metrics(), out)


def export_encoder(fed: DictConfig, state: dict[str, torch.Tensor], history: list[dict[str, Any]],
                   sites_seen: Iterable[str], rows: list[dict[str, Any]], out: Path) -> Path:
    """Save the global encoder (aligned model when an align stage ran) with a model card, and the
    task heads (``heads.safetensors``, card section ``heads``) when a heads round ran.

    Args:
        fed: The run's federation config.
        state: The global state (every group).
        history: The rounds so far, as the checkpoint keeps them.
        sites_seen: Names of the sites that took part.
        rows: The run's metrics rows (its privacy summary goes in the card).
        out: The folder to write.
    """
    from fedmri.align import build_aligned_model
    from fedmri.export import save_encoder
    from fedmri.models import build_encoder

    cfg = run_config(fed)
    aligned = any(stage_registry.get(s.name).aligns for s in fed.stages)
    extra = {"run": fed.name, "rounds": len(history), "sites": sorted(sites_seen),
             "stages": [f"{s.name} x{s.rounds}" for s in fed.stages],
             "privacy": model_card_privacy(privacy_summary(rows))}
    # Heads go with the encoder once a heads round has updated them.
    tuned = any(stage_registry.get(h["stage"]).tunes_heads and h["sites"] for h in history)
    if tuned:
        from fedmri.heads.export import heads_card, save_heads

        evaluated = [h["metrics"] for h in history if not stage_registry.get(h["stage"]).trains and h["sites"]]
        extra["heads"] = heads_card(cfg, evaluated[-1] if evaluated else {})
    if aligned:
        model = build_aligned_model(cfg, image_encoder=build_encoder(cfg))
        wire.load_align_state(model, wire.select(state, wire.ALIGN_GROUPS))
    else:
        model = build_encoder(cfg)
        model.load_state_dict({k.split("/", 1)[1]: v for k, v in wire.select(state, [wire.ENCODER]).items()})
    folder = save_encoder(out, model, config=cfg, extra=extra)
    if tuned:
        save_heads(folder, state)
    return folder


def _aggregator(stage: DictConfig, aggregator: Any) -> Any:
    """The stage's aggregator, wrapped for central or distributed site-level DP when the stage asks for it."""
    if stage.site_dp.mode == "distributed":
        return DistributedSiteDP(aggregator, float(stage.site_dp.noise_multiplier))
    if stage.site_dp.mode != "central":
        return aggregator
    # Noise from the OS, never from the run seed: every site knows that seed, and the
    # checkpoint holds the seeded generator's state; either would let the noise be replayed.
    return CentralSiteDP(aggregator, float(stage.site_dp.clip_norm), float(stage.site_dp.noise_multiplier),
                         np.random.default_rng())


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Export the encoder of a run's last complete round (``fedmri export``).

    Raises:
        InputError: The folder is not a run folder or has no complete round yet.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "federation.yaml").is_file():
        raise InputError(f"{run_dir} is not a run folder (no federation.yaml); give runs/<name>")
    ckpt = load_checkpoint(run_dir / "ckpt")
    if ckpt is None:
        raise InputError(f"run {run_dir} has no complete round yet; nothing to export")
    state, _, meta = ckpt
    return export_encoder(load_federation(run_dir / "federation.yaml"), state, meta.get("history", []),
                          meta.get("sites_seen", []), RunDir(run_dir).read_metrics(),
                          Path(out) if out else run_dir / "encoder")
