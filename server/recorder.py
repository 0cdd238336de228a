"""What a run writes about its rounds: one shape per round, from the round's outcome.

The pipeline runs a round and returns a :class:`RoundOutcome`; the
:class:`Recorder` turns it into the round's ``metrics.jsonl`` rows (one per
site that was asked, one ``site: "all"`` row), its entry in the run's history
(what the checkpoint keeps and the model card reads), and at the end
``results.json``, the plots and the privacy report. The same rows go to the
run's trackers (:mod:`fedmri.server.tracking`). Nothing else in the
coordinator writes rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmri import stages as stage_registry
from fedmri.server.privacy_report import write_privacy_report
from fedmri.server.rundir import RunDir


@dataclass
class RoundOutcome:
    """What one round did, for logs, metrics and tests."""

    stage: str
    round: int
    server_round: int
    sampled: list[int]
    accepted: list[int] = field(default_factory=list)
    aggregated: dict[str, float] = field(default_factory=dict)
    updated: bool = False
    # Seconds the coordinator spent on this round's parts: validate, aggregate, round (all of
    # run_round) and checkpoint. Not written to the run folder.
    timings: dict[str, float] = field(default_factory=dict)
    # (node, "failed" | "declined" | "rejected", reason), in the order the coordinator learnt them.
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    # (node, its metrics, bytes it sent up) of every accepted reply, in validation's order.
    replies: list[tuple[int, dict[str, float], int]] = field(default_factory=list)
    # Bytes sent down to each site, seconds from sending to the last reply, unix time of the replies.
    bytes_down: int = 0
    wall_s: float = 0.0
    replied_at: float = 0.0
    # node -> bytes sent down to it when sites got different amounts (server/downlink.py: only the
    # groups a site lacks, and a resend); a node not in it got ``bytes_down``.
    bytes_down_by_node: dict[int, int] = field(default_factory=dict)
    # Updates held in memory at most at once, and updates that waited on disk (strategies.updates).
    # Not written to the run folder.
    updates_in_memory: int = 0
    updates_spilled: int = 0

    def sent_to(self, node: int) -> int:
        """Bytes sent down to ``node`` this round."""
        return self.bytes_down_by_node.get(node, self.bytes_down)

    def _by_status(self, status: str) -> dict[int, str]:
        return {node: reason for node, s, reason in self.problems if s == status}

    @property
    def declined(self) -> dict[int, str]:
        """node -> reason of every site that declined."""
        return self._by_status("declined")

    @property
    def failed(self) -> dict[int, str]:
        """node -> reason of every site whose reply was an error or never came."""
        return self._by_status("failed")

    @property
    def rejected(self) -> dict[int, str]:
        """node -> reason of every update that validation rejected."""
        return self._by_status("rejected")


class Recorder:
    """Writes a run's rounds into its run folder and keeps the history.

    Args:
        run: The run folder.
        site_name: node id -> the site's name, for the rows.
    """

    def __init__(self, run: RunDir, site_name: Callable[[int], str]) -> None:
        self.run = run
        self.site_name = site_name
        self.history: list[dict[str, Any]] = []
        # Trackers that get the same rows as metrics.jsonl (fedmri.server.tracking).
        self.sinks: list[Any] = []

    def rows(self, out: RoundOutcome) -> list[dict[str, Any]]:
        """The round's metrics.jsonl rows: the sites that failed, declined or were rejected, the
        accepted ones with their metrics, then the aggregate."""
        base = {"stage": out.stage, "round": out.round, "server_round": out.server_round,
                "time": round(out.replied_at, 3)}
        rows = [base | {"site": self.site_name(node), "node": node, "status": status, "reason": reason}
                for node, status, reason in out.problems]
        rows += [base | {"site": self.site_name(node), "node": node, "status": "ok", "bytes-down": out.sent_to(node),
                         "bytes-up": up} | metrics for node, metrics, up in out.replies]
        trains = stage_registry.get(out.stage).trains
        client_wall = max((m.get("wall-time-s", 0.0) for _, m, _ in out.replies), default=0.0)
        status = "aggregated" if out.updated or not trains and out.aggregated else "skipped"
        agg_row = base | {"site": "all", "status": status, "sites": len(out.replies), "wall-time-s": out.wall_s,
                          "overhead-s": max(0.0, out.wall_s - client_wall),
                          "bytes-down": sum(out.sent_to(n) for n in out.sampled)}
        return rows + [out.aggregated | agg_row]  # the round's own wall time, not the sites' mean

    def record(self, out: RoundOutcome) -> None:
        """Append the round's rows and its history entry."""
        rows = self.rows(out)
        self.run.append_metrics(rows)
        for sink in self.sinks:
            sink.add(rows)
        self.history.append({"stage": out.stage, "round": out.round, "server_round": out.server_round,
                             "sites": [self.site_name(n) for n in out.accepted],
                             "declined": {self.site_name(k): v for k, v in out.declined.items()},
                             "failed": {self.site_name(k): v for k, v in out.failed.items()},
                             "rejected": {self.site_name(k): v for k, v in out.rejected.items()},
                             "metrics": out.aggregated})

    def evaluations(self) -> list[dict[str, Any]]:
        """History entries of the rounds that only scored the model."""
        return [h for h in self.history if not stage_registry.get(h["stage"]).trains]

    def finish(self, name: str, sites_seen: list[str]) -> dict[str, Any]:
        """results.json (the last evaluation, per site and aggregated), the plots and the privacy report."""
        final_eval = self.evaluations()
        per_site: dict[str, dict[str, float]] = {}
        rows = self.run.read_metrics()
        if final_eval:
            last = final_eval[-1]["server_round"]
            per_site = {str(r["site"]): {k: v for k, v in r.items() if isinstance(v, (int, float))
                                         and k not in ("round", "server_round", "site", "node", "time")}
                        for r in rows if r["server_round"] == last and r["status"] == "ok"}
        results = {"name": name, "evaluation": final_eval[-1]["metrics"] if final_eval else {},
                   "per_site": per_site, "rounds": len(self.history), "sites_seen": sites_seen}
        self.run.write_results(results)
        self.run.plot()
        write_privacy_report(self.run.path, rows)
        return results

    def finish_tracking(self) -> None:
        """The trackers' end of the run (reports as artifacts, runs marked finished); after the export."""
        for sink in self.sinks:
            sink.finish()
        self.close()

    def close(self) -> None:
        """Flush and close the trackers (also when a run stops early)."""
        for sink in self.sinks:
            sink.close()

