"""The site's privacy ledger: every private round and the ε it leaves, in SQLite.

One row per (run, stage, round) holds what the accountant needs, the noise
multiplier, sampling rate and number of DP-SGD steps, with the δ and the ε
that followed, and the private unit the round protected (``unit``:
``"patient"``, the sampling rate being per patient and a patient's whole
gradient clipped as one; or ``"series"``, one series or one image-report
pair). The accountant composes the same triples whatever the unit, so a
row's ε is per patient when every row it composes is patient-level; ledgers
written before the column existed are upgraded in place and their rows read
``"series"``, the only unit fedmri had then. A history mixing both units
protects a patient with one series (and one report) at the composed ε, since
for that patient the two units coincide; a patient with k series only as a
group of k in the series-level rows. ε is never carried forward from a stored value: each new row
recomputes it with Opacus' RDP accountant from the complete history of
triples in the file, so a restarted client continues exactly where the killed
one stopped. Two ε are kept per row:

- ``epsilon_run``: the run's ε after the round, composing that run's rounds;
- ``epsilon_total``: the site's ε after the round, composing every round of
  every run. RDP composes across runs the same way as across rounds of one
  run (the same patients are in every run), so the site total is the
  accountant over all rows, not a sum of per-run ε, which would overstate it.

Both are taken at the δ of the row's round. The file lives next to the
catalog by default (:func:`default_ledger_path`). Writes are single
``BEGIN IMMEDIATE`` transactions in WAL mode with ``synchronous=FULL``: a row
that :meth:`PrivacyLedger.record_round` returned survives ``kill -9`` and
power loss, and two processes never compute a total from the same history.

Re-recording a (run, stage, round) with the same numbers and the same
``inputs`` (a digest of the weights and request the round started from)
returns the stored row and spends nothing: a retried round (the reply was
lost, the client restarted) is the same release, since the site seeds every
draw from its secret, run, stage and round. Different numbers or inputs under
a recorded key raise :class:`LedgerConflictError`: a reused run name would
otherwise release a second update with the same noise, and the difference of
the two would cancel it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedmri.accounting import ACCOUNTANT, Step, rdp_epsilon
from fedmri.errors import FedmriError, InputError

LEDGER_FILE = "privacy-ledger.sqlite"
# Written into the SQLite header, so another database given as a ledger is refused.
_APPLICATION_ID = 0x664D5249  # "fMRI"
# 2 added the `unit` column; a format-1 file is upgraded when opened (_upgrade).
_VERSION = 2
_COLUMNS = ("run", "stage", "round", "noise_multiplier", "sample_rate", "steps", "delta",
            "epsilon_run", "epsilon_total", "accountant", "timestamp", "inputs", "unit")
# What a round can protect: a patient (all its series or pairs as one clipped term), or one series
# (one image-report pair in alignment). Format-1 rows are "series": fedmri had no other unit then.
UNITS = ("patient", "series")
_UNIT_COLUMN = "unit TEXT NOT NULL DEFAULT 'series'"
_SCHEMA = """CREATE TABLE rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- record order
    run TEXT NOT NULL, stage TEXT NOT NULL, round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, delta REAL NOT NULL,
    epsilon_run REAL NOT NULL, epsilon_total REAL NOT NULL, accountant TEXT NOT NULL, timestamp TEXT NOT NULL,
    inputs TEXT NOT NULL DEFAULT '',  -- digest of what the round started from ('' = not given)
    unit TEXT NOT NULL DEFAULT 'series',  -- the private unit: 'patient' or 'series'
    UNIQUE (run, stage, round))"""


class LedgerError(InputError):
    """The ledger file cannot be read or written (corrupt, not a ledger, locked)."""


class LedgerConflictError(FedmriError, ValueError):
    """A (run, stage, round) is already recorded with other noise, sampling rate, steps or δ."""


@dataclass(frozen=True)
class LedgerEntry:
    """One private round as recorded."""

    run: str
    stage: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    # ε of this run after the round, at `delta`.
    epsilon_run: float
    # ε of the site over all runs after the round, at `delta`.
    epsilon_total: float
    accountant: str
    # UTC, ISO 8601.
    timestamp: str
    # Digest of the round's inputs (weights and request) that a retry must repeat; '' = not given.
    inputs: str = ""
    # What the round protected: "patient" (q per patient, a patient's gradient clipped as one) or "series".
    unit: str = "series"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StageSpend:
    """One stage of one run. ε do not add up across stages (RDP composes sub-additively),
    so this reports the run's cumulative ε when the stage's last round was recorded."""

    run: str
    stage: str
    rounds: int
    steps: int
    epsilon_run: float
    delta: float
    last_update: str
    # The private unit of the stage's last round.
    unit: str = "series"


@dataclass(frozen=True)
class LedgerSummary:
    """Per run and stage, and the site's totals (the last row's ``epsilon_total``)."""

    stages: list[StageSpend]
    runs: int
    rounds: int
    epsilon_total: float
    delta: float | None
    last_update: str | None


def default_ledger_path(site_cfg: Any) -> Path:
    """Where a site keeps its ledger: ``policy.dp.ledger``, or ``<catalog>/privacy-ledger.sqlite``.

    Args:
        site_cfg: The site config from :func:`fedmri.client.site.load_site` (absolute paths).
    """
    policy = getattr(site_cfg, "policy", None)
    chosen = policy.dp.ledger if policy is not None and "dp" in policy else None
    return Path(chosen) if chosen else Path(site_cfg.catalog) / LEDGER_FILE


class PrivacyLedger:
    """The durable record of this site's DP rounds; see the module docstring.

    Args:
        path: The SQLite file.
        create: Make the file (and its folder) when missing; False only reads an existing one.

    Raises:
        FileNotFoundError: ``create`` is False and there is no file.
        LedgerError: The file is not a fedmri privacy ledger or cannot be read.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no privacy ledger at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._empty = False  # a brand-new file opened read-only: no table to read
        self._legacy = False  # a format-1 file, not upgraded yet: its rows are "series"
        with self._guard():
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            with self._guard():
                self._conn.row_factory = sqlite3.Row
                self._conn.execute("PRAGMA synchronous=FULL")
                self._open(create)
        except BaseException:
            self._conn.close()
            raise

    def _open(self, create: bool) -> None:
        conn = self._conn
        if _is_blank(conn) and create:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent; cannot change inside a transaction
            with self._transaction():
                if _is_blank(conn):  # another process may have made it meanwhile
                    conn.execute(_SCHEMA)
                    conn.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version={_VERSION}")
        elif _is_blank(conn):
            self._empty = True
            return
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id != _APPLICATION_ID:
            raise LedgerError(f"{self.path} is not a fedmri privacy ledger (another SQLite database); "
                              "give the ledger's path with --ledger")
        if version == 1:
            # Read as it is; upgraded by the first write (reading a backup must not change it).
            self._legacy = True
        elif version != _VERSION:
            raise LedgerError(f"{self.path} is a privacy ledger of format {version}; this fedmri reads "
                              f"formats 1 to {_VERSION}: upgrade fedmri")

    def _upgrade(self) -> None:
        """Format 1 -> 2: add the ``unit`` column, ``'series'`` for every stored row, in one transaction.

        Done by the first write only: a reader (``fedmri client privacy`` on a backup, a read-only
        copy) reads format 1 as it is, its rows as ``"series"``.
        """
        with self._transaction():
            if self._conn.execute("PRAGMA user_version").fetchone()[0] == 1:  # not upgraded meanwhile
                self._conn.execute(f"ALTER TABLE rounds ADD COLUMN {_UNIT_COLUMN}")
                self._conn.execute(f"PRAGMA user_version={_VERSION}")
        self._legacy = False

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self, run: str | None = None) -> list[LedgerEntry]:
        """Every recorded round, in record order; only ``run``'s when given."""
        if self._empty:
            return []
        where, args = ("WHERE run = ?", (str(run),)) if run is not None else ("", ())
        with self._guard():
            columns = [("'series' AS unit" if self._legacy and c == "unit" else c) for c in _COLUMNS]
            rows = self._conn.execute(f"SELECT {', '.join(columns)} FROM rounds {where} ORDER BY seq", args)
            return [LedgerEntry(**dict(row)) for row in rows]

    def history(self, run: str | None = None, stage: str | None = None) -> list[Step]:
        """``(noise_multiplier, sample_rate, steps)`` per round, as Opacus' ``RDPAccountant.history``."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries(run)
                if stage is None or e.stage == stage]

    def epsilon(self, delta: float, run: str | None = None, stage: str | None = None) -> float:
        """ε at ``delta``, recomputed from the stored history (all runs, one run, or one run's stage)."""
        return rdp_epsilon(self.history(run, stage), _check_delta(delta))

    def unit(self, run: str | None = None) -> str | None:
        """The private unit of the stored rounds (all runs, or ``run``'s): ``"patient"`` or ``"series"``
        when they agree, ``"mixed"`` when they do not (see the module docstring), None without rounds."""
        units = {e.unit for e in self.entries(run)}
        return None if not units else units.pop() if len(units) == 1 else "mixed"

    def would_exceed(self, run: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     budget_total: float | None, budget_run: float | None, *,
                     stage: str | None = None, round: int | None = None,
                     extra: list[Step] | tuple[Step, ...] = (), inputs: str = "",
                     unit: str = "series") -> tuple[bool, float, float]:
        """Whether one more round would take the site past a budget; records nothing.

        Args:
            run, noise_multiplier, sample_rate, steps, delta: The prospective round.
            budget_total: Most ε across all runs; None for no limit.
            budget_run: Most ε for ``run``; None for no limit.
            stage, round: Give both to let a retry of a recorded round cost nothing.
            extra: Other mechanisms of the same run planned alongside, not recorded yet.
            inputs, unit: As in :meth:`record_round`.

        Returns:
            ``(exceeds, epsilon_total, epsilon_run)`` after the round; ``exceeds`` when
            either ε is above its budget (reaching it exactly is allowed).

        Raises:
            ValueError: A value out of range. LedgerConflictError: see :meth:`record_round`.
        """
        step, run, unit = _check_step(noise_multiplier, sample_rate, steps), str(run), check_unit(unit)
        _check_delta(delta)
        budgets = [_check_budget(budget_total, "budget_total"), _check_budget(budget_run, "budget_run")]
        everything, mine = self.history(), self.history(run)
        if stage is None or round is None or self._existing(*_check_key(run, stage, round), step, delta,
                                                            inputs, unit) is None:
            everything, mine = everything + [step], mine + [step]
        pending = [_check_step(*e) for e in extra]
        everything, mine = everything + pending, mine + pending
        eps_total, eps_run = rdp_epsilon(everything, delta), rdp_epsilon(mine, delta)
        exceeds = any(b is not None and eps > b for b, eps in zip(budgets, (eps_total, eps_run)))
        return exceeds, eps_total, eps_run

    def record_round(self, run: str, stage: str, round: int, noise_multiplier: float, sample_rate: float,
                     steps: int, delta: float, inputs: str = "", *, unit: str = "series") -> LedgerEntry:
        """Record a private round that ran, in one durable transaction; call before its update leaves.

        Args:
            run, stage, round: The key of the round.
            noise_multiplier, sample_rate, steps, delta: The mechanism, ``sample_rate`` per ``unit``.
            inputs: Digest of the weights and request the round started from (see the module docstring).
            unit: What the round protected: ``"patient"`` or ``"series"`` (default: format 1's only unit).

        Returns:
            The new row, or the stored one when this (run, stage, round) is already
            recorded with the same numbers (a retry: nothing more is spent).

        Raises:
            ValueError: A value out of range.
            LedgerConflictError: The key is recorded with other numbers.
            LedgerError: The file cannot be written.
        """
        run, stage, round = _check_key(run, stage, round)
        step, delta, unit = _check_step(noise_multiplier, sample_rate, steps), _check_delta(delta), check_unit(unit)
        if self._legacy:
            self._upgrade()
        with self._transaction():
            existing = self._existing(run, stage, round, step, delta, inputs, unit)
            if existing is not None:
                return existing
            everything, mine = self.history(), self.history(run)
            entry = LedgerEntry(run, stage, round, *step, delta, epsilon_run=rdp_epsilon(mine + [step], delta),
                                epsilon_total=rdp_epsilon(everything + [step], delta), accountant=ACCOUNTANT,
                                timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), inputs=str(inputs),
                                unit=unit)
            row = entry.to_dict()
            self._conn.execute(f"INSERT INTO rounds ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row[c] for c in _COLUMNS))
        return entry

    def summary(self) -> LedgerSummary:
        """Rounds, steps and the run's ε per run and stage; the site's totals. Needs no Opacus."""
        entries = self.entries()
        groups: dict[tuple[str, str], list[LedgerEntry]] = {}
        for e in entries:
            groups.setdefault((e.run, e.stage), []).append(e)
        stages = [StageSpend(run, stage, len(rows), sum(r.steps for r in rows), rows[-1].epsilon_run,
                             rows[-1].delta, rows[-1].timestamp, rows[-1].unit)
                  for (run, stage), rows in groups.items()]
        last = entries[-1] if entries else None
        return LedgerSummary(stages, runs=len({e.run for e in entries}), rounds=len(entries),
                             epsilon_total=last.epsilon_total if last else 0.0,
                             delta=last.delta if last else None, last_update=last.timestamp if last else None)

    def _existing(self, run: str, stage: str, round: int, step: Step, delta: float,
                  inputs: str = "", unit: str = "series") -> LedgerEntry | None:
        """The stored row of this key if its numbers and inputs match; raises if they differ."""
        for e in self.entries(run):
            if (e.stage, e.round) == (stage, round):
                if e.inputs != str(inputs):
                    raise LedgerConflictError(
                        f"run {run!r} stage {stage!r} round {round} is already recorded from other weights or "
                        "another request: the run name was reused; a new run needs a new name")
                if (e.noise_multiplier, e.sample_rate, e.steps, e.delta, e.unit) == (*step, delta, unit):
                    return e
                raise LedgerConflictError(
                    f"run {run!r} stage {stage!r} round {round} is already recorded with noise "
                    f"{e.noise_multiplier}, sample rate {e.sample_rate}, {e.steps} steps, delta {e.delta}, "
                    f"unit {e.unit}; not {step[0]}, {step[1]}, {step[2]}, {delta}, {unit}: a retry must repeat "
                    "the same round")
        return None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._guard():
            self._conn.execute("BEGIN IMMEDIATE")  # takes the write lock before reading the history
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot use the privacy ledger {self.path}: {exc}; if the file is damaged, "
                              "restore it from a backup (deleting it forgets the privacy already spent)") from None


def check_unit(unit: str) -> str:
    """``unit`` if it is one of :data:`UNITS`.

    Raises:
        ValueError: Any other value, naming the choices.
    """
    if unit not in UNITS:
        raise ValueError(f"the private unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return str(unit)


def _is_blank(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def _check_key(run: str, stage: str, round: int) -> tuple[str, str, int]:
    run = str(run)
    if not run.strip() or not isinstance(stage, str) or not stage.strip():
        raise ValueError(f"run and stage must be non-empty, got run={run!r} stage={stage!r}")
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 1:
        raise ValueError(f"round must be an integer >= 1, got {round!r}")
    return run, stage, int(round)


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> Step:
    noise, rate = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}: a round without noise "
                         "has no finite ε and must be declined, not recorded")
    if not 0 < rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return noise, rate, int(steps)


def _check_delta(delta: float) -> float:
    if not 0 < float(delta) < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_budget(budget: float | None, name: str) -> float | None:
    if budget is not None and not (math.isfinite(float(budget)) and float(budget) > 0):
        raise ValueError(f"{name} must be a finite ε > 0 or None (no limit), got {budget!r}")
    return None if budget is None else float(budget)
