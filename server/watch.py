"""The live view of a round: ``round.json`` in the run folder, and what ``fedmri status --watch`` prints from it.

The coordinator rewrites ``round.json`` (atomically) when a round starts and
at each reply: which sites were asked, which replied, declined or failed (with
the reason) and when. ``fedmri status --watch`` reads it with ``state.json``,
``federation.yaml`` and ``metrics.jsonl``, so it needs no connection to the
coordinator and works the same for a simulation and a deployment.

The estimate of what is left is the mean wall time of the rounds done so far,
per stage, times the rounds still to run; a stage that has not run yet is
counted at the mean of all rounds done (marked ``~``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

FILE = "round.json"


class RoundProgress:
    """Keeps ``<run>/round.json`` up to date during one round.

    Args:
        write: Writes the document (``RunDir.write_progress``).
        stage, round, rounds, server_round: Which round.
        sites: The sites asked this round, by name.
    """

    def __init__(self, write: Any, stage: str, round: int, rounds: int, server_round: int,
                 sites: list[str]) -> None:
        self.write = write
        now = time.time()
        self.doc: dict[str, Any] = {"stage": stage, "round": round, "rounds": rounds, "server_round": server_round,
                                    "started": now, "updated": now, "done": False,
                                    "sites": {name: {"status": "pending"} for name in sites}}
        self.write(self.doc)

    def mark(self, site: str, status: str, reason: str | None = None) -> None:
        """``site`` replied (``replied``), or ``declined`` / ``failed`` / ``rejected`` with ``reason``."""
        entry: dict[str, Any] = {"status": status, "at": time.time()}
        if reason:
            entry["reason"] = reason
        self.doc["sites"][site] = entry
        self.doc["updated"] = entry["at"]
        self.write(self.doc)

    def finish(self, problems: list[tuple[str, str, str]] = ()) -> None:
        """The round is over: each (site, status, reason) of ``problems`` replaces what the site showed
        (a site that never answered becomes ``failed``; one whose update validation rejected, ``rejected``)."""
        now = time.time()
        for site, status, reason in problems:
            entry = self.doc["sites"].get(site, {})
            if entry.get("status") in ("pending", "replied", None):
                self.doc["sites"][site] = {"status": status, "reason": reason, "at": entry.get("at", now)}
        self.doc["done"] = True
        self.doc["updated"] = now
        self.write(self.doc)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def remaining_estimate(run_dir: Path, progress: dict[str, Any] | None, now: float) -> tuple[float, bool] | None:
    """(seconds left at ``now``, whether part of it is a guess from other stages), or None before any round
    finished."""
    from omegaconf import OmegaConf

    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("site") == "all" and isinstance(row.get("wall-time-s"), (int, float)):
                rows.append(row)
    if not rows or not (run_dir / "federation.yaml").is_file():
        return None
    stages = OmegaConf.load(run_dir / "federation.yaml").stages
    by_stage: dict[str, list[float]] = {}
    for row in rows:
        by_stage.setdefault(str(row["stage"]), []).append(float(row["wall-time-s"]))
    overall = statistics.mean(t for ts in by_stage.values() for t in ts)
    done = {(str(r["stage"]), int(r["round"])) for r in rows}
    left, guessed = 0.0, False
    for stage in stages:
        name = str(stage.name)
        todo = [r for r in range(1, int(stage.rounds) + 1) if (name, r) not in done]
        if not todo:
            continue
        per_round = statistics.mean(by_stage[name]) if name in by_stage else overall
        guessed |= name not in by_stage
        left += per_round * len(todo)
        if progress and not progress.get("done") and progress.get("stage") == name:
            left -= min(per_round, now - float(progress.get("started", now)))
    return max(0.0, left), guessed


def watch_lines(run_dir: Path, now: float | None = None) -> list[str]:
    """What ``fedmri status --watch`` prints for one run folder."""
    now = time.time() if now is None else now
    run_dir = Path(run_dir)
    state = _read_json(run_dir / "state.json") or {}
    progress = _read_json(run_dir / FILE)
    lines = [f"run {run_dir}: {state.get('status', 'not started')}"]
    started = state.get("started_at")
    if isinstance(started, (int, float)):
        lines[0] += f", elapsed {_duration(now - started)}"
    estimate = remaining_estimate(run_dir, progress, now)
    if estimate is not None and state.get("status") == "running":
        lines[0] += f", about {'~' if estimate[1] else ''}{_duration(estimate[0])} left"
    if not progress:
        lines.append("  no round has started yet")
        return lines
    head = (f"  {progress['stage']} round {progress['round']}/{progress['rounds']} "
            f"(global {progress['server_round']}), ")
    head += ("done" if progress.get("done") else f"running for {_duration(now - float(progress['started']))}")
    lines.append(head)
    for site, entry in sorted(progress.get("sites", {}).items()):
        status = entry.get("status", "?")
        if status == "pending":
            detail = f"pending for {_duration(now - float(progress['started']))}"
        else:
            detail = f"{status} after {_duration(float(entry.get('at', now)) - float(progress['started']))}"
            if entry.get("reason"):
                detail += f": {entry['reason']}"
        lines.append(f"    {site:<16} {detail}")
    return lines
