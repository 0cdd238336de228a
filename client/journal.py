"""The site's own record of the rounds it was asked to do: ``rounds.jsonl`` beside its catalog.

One line per training or evaluation request the ClientApp handled: when, which
run, stage and round, the result (``ok``, ``declined`` or ``failed``), the reason
of a decline or failure, the seconds it took and the examples it used. It is
written at the site for the site admin (``fedmri client status``) and never
sent anywhere. Writing it can never cost a round: an error here is logged and
the reply goes out as it would have. It stays bounded: past :data:`MAX_BYTES` the
file moves to ``rounds.jsonl.1`` (replacing the one before) and a new one starts,
so the site keeps between one and two files' worth of its latest rounds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "rounds.jsonl"
# About 20,000 rounds a file; the journal never holds more than two.
MAX_BYTES = 4 * 1024 * 1024


def journal_path(site_cfg: Any) -> Path:
    """``<catalog>/rounds.jsonl``."""
    return Path(site_cfg.catalog) / FILE


def note_round(site_cfg: Any, request: Any, result: str, reason: str | None, seconds: float,
               examples: float | None = None) -> None:
    """Append one request's outcome to the site's journal; never raises."""
    try:
        entry: dict[str, Any] = {"time": round(time.time(), 3), "run": getattr(request, "run_name", None),
                                 "stage": getattr(request, "stage", None), "round": getattr(request, "round", None),
                                 "result": result, "seconds": round(seconds, 3)}
        if reason:
            entry["reason"] = reason.splitlines()[0]
        if examples is not None:
            entry["examples"] = examples
        path = journal_path(site_cfg)
        if path.is_file() and path.stat().st_size >= MAX_BYTES:
            os.replace(path, _older(path))
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    except Exception:  # noqa: BLE001 -- the journal is for the admin; the round must not fail over it
        log.exception("could not write the site's round journal")


def read_journal(site_cfg: Any) -> list[dict[str, Any]]:
    """The journal's entries (the rotated file's, then the current one's), oldest first; lines that do
    not parse are skipped."""
    path = journal_path(site_cfg)
    out = []
    for part in (_older(path), path):
        if not part.is_file():
            continue
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out


def _older(path: Path) -> Path:
    return path.with_name(path.name + ".1")
