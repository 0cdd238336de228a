"""The coordinator's staged pipeline: rounds of pretrain -> align -> heads -> evaluate.

Plain Python over a Flower ``Grid`` (anything with ``get_node_ids()`` and
``send_and_receive(messages, timeout=...)``), so tests drive it in-process and
the ServerApp only reads its context and calls :meth:`Pipeline.run`.

Per round: sample sites, send the stage's down groups and the round's
hyperparameters (schedules evaluated here), collect replies, record declines
and failures, validate updates (strategies.validation), aggregate the accepted
ones (strategies), move the server-side teacher, write metrics and a
checkpoint. A round with fewer than ``min_sites`` useful replies leaves the
weights as they were; the run goes on.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf

from fedmri import stages as stage_registry
from fedmri import wire
from fedmri.errors import FedmriError
from fedmri.protocol import PROTOCOL_VERSION
from fedmri.server.checkpoint import load_checkpoint, save_checkpoint
from fedmri.server.config import dp_request, run_config
from fedmri.server.privacy_report import model_card_privacy, privacy_summary, write_privacy_report
from fedmri.server.rundir import RunDir

# Test hook: stop the coordinator right after this global round's checkpoint,
# as a kill would (the resume tests use it).
_STOP_AFTER_ENV = "FEDMRI_TEST_STOP_AFTER_ROUND"


class GridLike(Protocol):
    def get_node_ids(self) -> Any: ...
    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any: ...


class StoppedForTest(RuntimeError):
    """Raised by the test hook in place of a kill."""


@dataclass
class RoundOutcome:
    """What one round did, for logs, metrics and tests."""

    stage: str
    round: int
    server_round: int
    sampled: list[int]
    accepted: list[int] = field(default_factory=list)
    declined: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregated: dict[str, float] = field(default_factory=dict)
    updated: bool = False


def _nbytes(record: ArrayRecord) -> int:
    return int(sum(record[k].numpy().nbytes for k in record.keys()))


def _digest(record: ArrayRecord) -> str:
    h = hashlib.sha256()
    for k in sorted(record.keys()):
        h.update(k.encode())
        h.update(record[k].numpy().tobytes())
    return h.hexdigest()


def aggregate_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The coordinator's aggregate of site metrics: counts of series (``num-examples`` and every
    ``*-examples``, e.g. ``dense-examples``) summed, every other finite value weighted by the
    site's ``num-examples`` over the sites that have it."""
    weights = [float(r.get("num-examples", 0)) for r in rows]
    total = sum(weights)
    out: dict[str, float] = {"num-examples": total}
    keys = sorted({k for r in rows for k in r if k not in ("num-examples", "declined")})
    for k in keys:
        if k.endswith("-examples"):  # the series behind a figure: the sites' together
            out[k] = sum(float(r[k]) for r in rows if k in r)
            continue
        pairs = [(w, float(r[k])) for w, r in zip(weights, rows) if k in r and math.isfinite(float(r[k]))]
        wsum = sum(w for w, _ in pairs)
        if pairs:
            out[k] = sum(w * v for w, v in pairs) / wsum if wsum > 0 else sum(v for _, v in pairs) / len(pairs)
    return out


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
    """

    def __init__(self, fed: DictConfig, run_dir: str | Path | None = None, *, train_sites: list[str] | None = None,
                 eval_sites: list[str] | None = None, init_state: dict[str, torch.Tensor] | None = None) -> None:
        from fedmri.strategies import build_aggregator

        self.fed = fed
        self.cfg = run_config(fed)
        self.run = RunDir(run_dir or Path(fed.run_root) / fed.name)
        self.aggregators = [_aggregator(s, build_aggregator(OmegaConf.to_container(s.strategy, resolve=True)))
                            for s in fed.stages]
        # (noise multiplier, site sampling rate) of every round released under central site-level DP.
        self.central_dp: list[tuple[float, float]] = []
        self.state: dict[str, torch.Tensor] = {}
        self.rng = np.random.default_rng(int(fed.seed))
        self.history: list[dict[str, Any]] = []
        self.sites_seen: set[str] = set()
        self.outcomes: list[RoundOutcome] = []
        self.train_sites = None if train_sites is None else set(train_sites)
        self.eval_sites = None if eval_sites is None else set(eval_sites)
        self.init_state = init_state
        self.site_names: dict[int, str] = {}

    # ----------------------------------------------------------------- set-up
    def _start_or_resume(self) -> tuple[int, int, int]:
        """(stage index, next round in that stage, global rounds done)."""
        self.run.write_configs(self.fed, self.cfg)
        ckpt = load_checkpoint(self.run.ckpt) if self.fed.resume else None
        if ckpt is None:
            if self.fed.resume:
                log(WARNING, "fedmri: --resume given but %s has no checkpoint; starting from round 1", self.run.ckpt)
            if self.run.metrics_path.exists():
                self.run.metrics_path.unlink()
            self.state = wire.initial_state(self.cfg)
            if self.init_state is not None:
                unknown = set(self.init_state) - set(self.state)
                if unknown:
                    raise FedmriError(f"initial state has keys this encoder config lacks, e.g. {sorted(unknown)[0]}")
                self.state.update({k: v.clone() for k, v in self.init_state.items()})
            return 0, 1, 0
        state, strategy_arrays, meta = ckpt
        expected = wire.initial_state(self.cfg)
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise FedmriError(f"checkpoint in {self.run.ckpt} was made with another encoder config; "
                              "resume with the run's own federation.yaml or start a new run name")
        self.state = state
        self.rng.bit_generator.state = meta["rng"]
        self.history = meta.get("history", [])
        self.sites_seen = set(meta.get("sites_seen", []))
        self.central_dp = [tuple(x) for x in meta.get("central_dp", [])]
        for i, agg in enumerate(self.aggregators):
            arrays = {k.split("/", 1)[1]: v for k, v in strategy_arrays.items() if k.startswith(f"{i}/")}
            agg.load_state_dict(arrays, meta["strategies"][i])
        self.run.truncate_metrics_after(meta["server_round"])
        stage_i, rnd = meta["stage_index"], meta["round"] + 1
        if rnd > self.fed.stages[stage_i].rounds:
            stage_i, rnd = stage_i + 1, 1
        log(INFO, "fedmri: resuming %s after global round %d", self.fed.name, meta["server_round"])
        return stage_i, rnd, meta["server_round"]

    def _identify(self, grid: GridLike, nodes: list[int]) -> None:
        """Ask new sites for their versions and site name; refuse other protocol versions."""
        new = [n for n in nodes if n not in self.site_names]
        if not new:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(messages, timeout=60.0):
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "fedmri: site %s did not say who it is: %s", node, reply.error.reason)
                continue
            info = reply.content.config_records.get("versions", {})
            if int(info.get("protocol_version", -1)) != PROTOCOL_VERSION:
                log(WARNING, "fedmri: site %s speaks protocol %s, this server %s; it is left out", node,
                    info.get("protocol_version"), PROTOCOL_VERSION)
                self.site_names[node] = f"node-{node} (incompatible)"
                continue
            self.site_names[node] = str(info.get("site_name") or f"node-{node}")
            log(INFO, "fedmri: site %s is %r, fedmri %s", node, self.site_names[node], info.get("fedmri_version"))

    def _eligible(self, nodes: list[int], stage_i: int) -> list[int]:
        ok = [n for n in nodes if n in self.site_names and not self.site_names[n].endswith("(incompatible)")]
        only = self.train_sites if self._spec(stage_i).trains else self.eval_sites
        if only is not None:
            ok = [n for n in ok if self.site_names[n] in only]
        return ok

    def site(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def _wait_for_sites(self, grid: GridLike, stage_i: int) -> list[int]:
        need = self._min_sites(stage_i)
        deadline = time.monotonic() + float(self.fed.wait_for_sites_s)
        last = -1
        while True:
            self._identify(grid, sorted(int(n) for n in grid.get_node_ids()))
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
    def _round_config(self, stage_i: int, rnd: int, server_round: int) -> dict[str, Any]:
        stage = self.fed.stages[stage_i]
        # Each round runs at the schedule's value for its middle: round 1 of a
        # warm-up would otherwise train at a learning rate of exactly 0.
        fraction = (rnd - 0.5) / stage.rounds
        spec = self._spec(stage_i)
        values: dict[str, Any] = {
            "stage": stage.name, "round": rnd, "server-round": server_round, "local-steps": int(stage.local_steps),
            "seed": int(self.fed.seed), "run-name": str(self.fed.name), "protocol-version": PROTOCOL_VERSION,
            "fedmri-config": OmegaConf.to_yaml(self.cfg),
        }
        if spec.round_values is not None:
            earlier = [stage_registry.get(s.name) for s in self.fed.stages[:stage_i]]
            values |= spec.round_values(stage_registry.RoundInputs(self.cfg, stage, fraction, earlier))
        if spec.trains:
            values |= dp_request(stage)
        values |= self.aggregators[stage_i].client_config()
        return values

    def _spec(self, stage_i: int) -> stage_registry.StageSpec:
        return stage_registry.get(self.fed.stages[stage_i].name)

    def _sample(self, nodes: list[int], stage_i: int) -> list[int]:
        stage = self.fed.stages[stage_i]
        fraction = stage.fraction if stage.fraction is not None else self.fed.fraction
        k = min(len(nodes), max(self._min_sites(stage_i), math.ceil(fraction * len(nodes))))
        if k == len(nodes):
            return nodes
        return sorted(int(n) for n in self.rng.choice(nodes, size=k, replace=False))

    def _min_sites(self, stage_i: int) -> int:
        m = self.fed.stages[stage_i].min_sites
        return int(m if m is not None else self.fed.min_sites)

    def run_round(self, grid: GridLike, stage_i: int, rnd: int, server_round: int) -> RoundOutcome:
        from fedmri.strategies import validate_replies

        stage, spec = self.fed.stages[stage_i], self._spec(stage_i)
        groups = spec.groups(self.cfg)
        nodes = self._wait_for_sites(grid, stage_i)
        self.sites_seen.update(self.site(n) for n in nodes)
        sampled = self._sample(nodes, stage_i)
        out = RoundOutcome(stage.name, rnd, server_round, sampled)
        down = wire.to_record(wire.select(self.state, groups.down))
        down_bytes = _nbytes(down)
        config = ConfigRecord(self._round_config(stage_i, rnd, server_round))
        messages = [Message(RecordDict({"arrays": down, "config": config}), dst_node_id=n,
                            message_type=spec.message_type)
                    for n in sampled]
        log(INFO, "fedmri: %s round %d/%d (global %d): %d sites, %.1f MB down each", stage.name, rnd,
            stage.rounds, server_round, len(sampled), down_bytes / 1e6)
        t0 = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=float(self.fed.round_timeout_s)))
        wall = time.monotonic() - t0

        rows: list[dict[str, Any]] = []
        useful: list[Message] = []
        base = {"stage": stage.name, "round": rnd, "server_round": server_round, "time": round(time.time(), 3)}
        answered = set()
        # An error the SuperLink makes for a site (e.g. "Node Unavailable") comes
        # from the SuperLink itself: find the site by the message it answers.
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            answered.add(node)
            if reply.has_error():
                out.failed[node] = reply.error.reason
                rows.append(base | {"site": self.site(node), "node": node, "status": "failed", "reason": reply.error.reason})
                continue
            status = reply.content.config_records.get("status")
            if status is not None and status.get("declined"):
                out.declined[node] = str(status.get("reason", "declined"))
                rows.append(base | {"site": self.site(node), "node": node, "status": "declined", "reason": out.declined[node]})
                continue
            useful.append(reply)
        for node in sorted(set(sampled) - answered):
            out.failed[node] = f"no reply within {self.fed.round_timeout_s:.0f} s"
            rows.append(base | {"site": self.site(node), "node": node, "status": "failed", "reason": out.failed[node]})

        if not spec.trains:
            accepted = useful
        else:
            current = wire.to_record(wire.select(self.state, groups.up))
            # Under central site DP, clipping bounds each site; rejecting relative to the other
            # sites' norms would let one site's data decide whether another site counts.
            factor = math.inf if stage.site_dp.mode == "central" else float(self.fed.norm_bound_factor)
            accepted, rejected = validate_replies(current, useful, factor)
            for node, reason in rejected.items():
                out.rejected[int(node)] = reason
                rows.append(base | {"site": self.site(int(node)), "node": int(node), "status": "rejected", "reason": reason})
        metrics_by_node = {}
        for reply in accepted:
            node = int(reply.metadata.src_node_id)
            m = {k: float(v) for k, v in reply.content.metric_records.get("metrics", {}).items()
                 if isinstance(v, (int, float))}
            metrics_by_node[node] = m
            up = reply.content.array_records.get("arrays")
            rows.append(base | {"site": self.site(node), "node": node, "status": "ok", "bytes-down": down_bytes,
                                "bytes-up": _nbytes(up) if up is not None else 0} | m)
        out.accepted = sorted(metrics_by_node)

        # An evaluation is worth recording from any site that had data for it;
        # an update needs min_sites contributors.
        need = self._min_sites(stage_i) if spec.trains else 1
        if len(accepted) >= need:
            out.aggregated = aggregate_metrics(list(metrics_by_node.values()))
            if spec.trains:
                # Aggregation order must not depend on node ids (they change
                # when a site restarts): order by content.
                accepted = sorted(accepted, key=lambda r: _digest(r.content.array_records["arrays"]))
                new, _ = self.aggregators[stage_i].aggregate(server_round, current, accepted)
                self.state.update(wire.from_record(new))
                if spec.after_aggregate is not None:
                    spec.after_aggregate(self.state, config, stage)
                out.updated = True
                if stage.site_dp.mode == "central":
                    out.aggregated |= self._central_epsilon(stage, len(sampled) / len(nodes))
        else:
            log(WARNING, "fedmri: %s round %d had %d useful replies, fewer than %d; %s", stage.name, rnd,
                len(accepted), need, "weights unchanged" if spec.trains else "nothing to report")
        client_wall = max((m.get("wall-time-s", 0.0) for m in metrics_by_node.values()), default=0.0)
        agg_row = base | {"site": "all", "status": "aggregated" if out.updated or not spec.trains
                          and out.aggregated else "skipped", "sites": len(accepted), "wall-time-s": wall,
                          "overhead-s": max(0.0, wall - client_wall), "bytes-down": down_bytes * len(sampled)}
        rows.append(out.aggregated | agg_row)  # the round's own wall time, not the sites' mean
        self.run.append_metrics(rows)
        shown = {k: v for k, v in out.aggregated.items() if k.endswith("loss") or k in ("t2i_r5", "i2t_r5")}
        log(INFO, "fedmri: %s round %d/%d done in %.0f s: %s%s", stage.name, rnd, stage.rounds, wall,
            ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())) or "no metrics",
            f" ({len(accepted)} sites" + (f", {len(out.declined)} declined" if out.declined else "")
            + (f", {len(out.failed)} failed" if out.failed else "")
            + (f", {len(out.rejected)} rejected" if out.rejected else "") + ")")
        return out

    def _central_epsilon(self, stage: DictConfig, sample_rate: float) -> dict[str, float]:
        """Account one more round of central site-level DP; the run's ε so far at the stage's δ."""
        from fedmri.client.privacy.accountant import rdp_epsilon

        self.central_dp.append((float(stage.site_dp.noise_multiplier), float(sample_rate)))
        delta = float(stage.site_dp.delta)
        return {"site-dp-epsilon": rdp_epsilon([(z, q, 1) for z, q in self.central_dp], delta),
                "site-dp-delta": delta}

    # ------------------------------------------------------------------- main
    def run_all(self, grid: GridLike) -> dict[str, Any]:
        """Run every remaining round; returns the final results (also in results.json)."""
        stage_i, rnd, server_round = self._start_or_resume()
        stop_after = int(os.environ.get(_STOP_AFTER_ENV, "0") or 0)
        while stage_i < len(self.fed.stages):
            stage = self.fed.stages[stage_i]
            server_round += 1
            self.run.write_state(name=self.fed.name, status="running", stage=stage.name, round=rnd,
                                 rounds=stage.rounds, server_round=server_round, sites_seen=sorted(self.sites_seen),
                                 last_metrics=self.history[-1] if self.history else {})
            outcome = self.run_round(grid, stage_i, rnd, server_round)
            self.outcomes.append(outcome)
            self.history.append({"stage": stage.name, "round": rnd, "server_round": server_round,
                                 "sites": [self.site(n) for n in outcome.accepted],
                                 "declined": {self.site(k): v for k, v in outcome.declined.items()},
                                 "failed": {self.site(k): v for k, v in outcome.failed.items()},
                                 "rejected": {self.site(k): v for k, v in outcome.rejected.items()},
                                 "metrics": outcome.aggregated})
            self._checkpoint(stage_i, rnd, server_round)
            if stop_after and server_round == stop_after:
                raise StoppedForTest(f"stopped after global round {server_round} ({_STOP_AFTER_ENV})")
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
        save_checkpoint(self.run.ckpt, server_round, self.state, arrays, {
            "stage_index": stage_i, "stage": self.fed.stages[stage_i].name, "round": rnd,
            "rng": self.rng.bit_generator.state, "strategies": scalars, "history": self.history,
            "sites_seen": sorted(self.sites_seen), "site_names": {str(k): v for k, v in self.site_names.items()},
            "central_dp": [list(x) for x in self.central_dp],
        })

    def _finish(self) -> dict[str, Any]:
        final_eval = [h for h in self.history if not stage_registry.get(h["stage"]).trains]
        per_site: dict[str, dict[str, float]] = {}
        rows = self.run.read_metrics()
        if final_eval:
            last = final_eval[-1]["server_round"]
            per_site = {str(r["site"]): {k: v for k, v in r.items() if isinstance(v, (int, float))
                                         and k not in ("round", "server_round", "site", "node", "time")}
                        for r in rows if r["server_round"] == last and r["status"] == "ok"}
        results = {"name": self.fed.name, "evaluation": final_eval[-1]["metrics"] if final_eval else {},
                   "per_site": per_site, "rounds": len(self.history), "sites_seen": sorted(self.sites_seen)}
        self.run.write_results(results)
        self.run.plot()
        write_privacy_report(self.run.path, rows)
        if self.fed.export:
            self.export(self.run.path / "encoder")
        self.run.write_state(name=self.fed.name, status="finished", stage=None, round=None,
                             server_round=len(self.history), sites_seen=sorted(self.sites_seen),
                             last_metrics=self.history[-1] if self.history else {})
        return results

    def export(self, out: Path) -> Path:
        """Save the global encoder (aligned model when an align stage ran) with a model card, and the
        task heads (``heads.safetensors``, card section ``heads``) when a heads round ran."""
        from fedmri.align import build_aligned_model
        from fedmri.export import save_encoder
        from fedmri.models import build_encoder

        aligned = any(stage_registry.get(s.name).aligns for s in self.fed.stages)
        extra = {"run": self.fed.name, "rounds": len(self.history), "sites": sorted(self.sites_seen),
                 "stages": [f"{s.name} x{s.rounds}" for s in self.fed.stages],
                 "privacy": model_card_privacy(privacy_summary(self.run.read_metrics()))}
        # Heads go with the encoder once a heads round has updated them.
        tuned = any(stage_registry.get(h["stage"]).tunes_heads and h["sites"] for h in self.history)
        if tuned:
            from fedmri.heads.export import heads_card, save_heads

            evaluated = [h["metrics"] for h in self.history if not stage_registry.get(h["stage"]).trains and h["sites"]]
            extra["heads"] = heads_card(self.cfg, evaluated[-1] if evaluated else {})
        if aligned:
            model = build_aligned_model(self.cfg, image_encoder=build_encoder(self.cfg))
            wire.load_align_state(model, wire.select(self.state, wire.ALIGN_GROUPS))
        else:
            model = build_encoder(self.cfg)
            model.load_state_dict({k.split("/", 1)[1]: v for k, v in wire.select(self.state, [wire.ENCODER]).items()})
        folder = save_encoder(out, model, config=self.cfg, extra=extra)
        if tuned:
            save_heads(folder, self.state)
        return folder


def _aggregator(stage: DictConfig, aggregator: Any) -> Any:
    """The stage's aggregator, wrapped for central site-level DP when the stage asks for it."""
    if stage.site_dp.mode != "central":
        return aggregator
    from fedmri.strategies.site_dp import CentralSiteDP

    # Noise from the OS, never from the run seed: every site knows that seed, and the
    # checkpoint holds the seeded generator's state; either would let the noise be replayed.
    return CentralSiteDP(aggregator, float(stage.site_dp.clip_norm), float(stage.site_dp.noise_multiplier),
                         np.random.default_rng())


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Export the encoder of a run's last complete round (``fedmri export``).

    Raises:
        InputError: The folder is not a run folder or has no complete round yet.
    """
    from fedmri.errors import InputError
    from fedmri.server.config import load_federation

    run_dir = Path(run_dir)
    if not (run_dir / "federation.yaml").is_file():
        raise InputError(f"{run_dir} is not a run folder (no federation.yaml); give runs/<name>")
    ckpt = load_checkpoint(run_dir / "ckpt")
    if ckpt is None:
        raise InputError(f"run {run_dir} has no complete round yet; nothing to export")
    pipeline = Pipeline(load_federation(run_dir / "federation.yaml"), run_dir)
    pipeline.state, _, meta = ckpt
    pipeline.history = meta.get("history", [])
    pipeline.sites_seen = set(meta.get("sites_seen", []))
    return pipeline.export(Path(out) if out else run_dir / "encoder")
