"""The site catalog's SQLite schema, pseudonyms and read-side queries.

``CATALOG_DIR/catalog.sqlite`` holds one row per indexed series, the files seen
(so re-indexing unchanged data costs a ``stat`` per file), the inputs skipped by
the latest run and a short run history. ``CATALOG_DIR/site.salt`` is the site's
random HMAC key: patient, study and series pseudonyms are HMAC-SHA256 of the
DICOM identifier under it, so they cannot be reversed or linked across sites
without the salt, which never leaves the site. Splits are kept per patient in
the ``patients`` table: no patient is in two splits, re-indexing never moves
one, and new patients fill the split furthest below its target share, so even
a site with ten patients gets a validation and a test patient.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sqlite3
from collections import Counter
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

from fedmri.data.dicom import Skipped
from fedmri.errors import ConfigError, InputError

CATALOG_FILE = "catalog.sqlite"
SALT_FILE = "site.salt"
CACHE_DIR = "cache"
SPLITS = ("train", "val", "test")
SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- dicom | nifti
    header TEXT,                   -- JSON DicomHeader; NULL when skipped
    skip_reason TEXT               -- why read_header refused the file
);
CREATE TABLE series (
    id TEXT PRIMARY KEY,           -- pseudonymous series id: the key later code may show
    series_uid TEXT NOT NULL UNIQUE,
    patient_id TEXT NOT NULL,      -- pseudonymous
    study_id TEXT NOT NULL,        -- pseudonymous study link
    study_uid TEXT NOT NULL,
    accession TEXT NOT NULL,
    split TEXT NOT NULL,
    sequence TEXT, body_region TEXT, vendor TEXT, plane TEXT,
    shape TEXT NOT NULL,           -- JSON [I, J, K] as acquired
    spacing TEXT NOT NULL,         -- JSON [dx, dy, dz] mm as acquired
    meta TEXT NOT NULL,            -- JSON Volume.meta without PatientID
    report_findings TEXT, report_impression TEXT,
    label_findings TEXT,           -- JSON list of codes; NULL = no labels row
    age REAL, sex TEXT,            -- labels.csv, else the DICOM header
    mask_source TEXT, mask_stat TEXT,
    source_kind TEXT NOT NULL,     -- dicom | nifti
    source_paths TEXT NOT NULL,    -- JSON list
    files_digest TEXT NOT NULL,    -- sha256 of (path, size, mtime_ns) of the source files
    settings TEXT NOT NULL,        -- JSON preprocessing settings
    settings_digest TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    cache_path TEXT NOT NULL,      -- relative to the catalog folder
    has_mask INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE INDEX series_split ON series (split);
CREATE TABLE patients (            -- a patient's split, fixed when first seen
    patient_id TEXT PRIMARY KEY,   -- pseudonymous
    split TEXT NOT NULL
);
CREATE TABLE failed_series (       -- series that could not be read, so unchanged ones are not read again
    series_uid TEXT PRIMARY KEY,
    files_digest TEXT NOT NULL,
    reader TEXT NOT NULL,          -- fedmri version that failed: an upgrade tries again
    path TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE skipped (path TEXT NOT NULL, reason TEXT NOT NULL, run_id INTEGER NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
    n_series INTEGER NOT NULL, n_loaded INTEGER NOT NULL, n_preprocessed INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL, settings TEXT NOT NULL
);
"""
# Schema upgrades, applied in order by open_catalog: {from_version: script}.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}


def open_catalog(catalog_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    """Open (and create or upgrade) a catalog.

    The connection is in autocommit mode: writers wrap their work in an explicit
    ``BEGIN IMMEDIATE`` ... ``COMMIT`` so an interrupted run changes nothing.

    Args:
        catalog_dir: the catalog folder.
        create: make the folder and an empty catalog if there is none.

    Raises:
        InputError: no catalog there (and ``create`` is false), or one written
            by a newer fedmri.
    """
    path = Path(catalog_dir) / CATALOG_FILE
    if not create and not path.is_file():
        raise InputError(f"no catalog at {catalog_dir} ({CATALOG_FILE} missing); "
                         "run `fedmri data index ... --out CATALOG_DIR` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")  # readers (show, Dataset) work while an index runs
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise InputError(f"catalog {path} has schema version {version}, newer than this fedmri "
                         f"understands ({SCHEMA_VERSION}); upgrade fedmri")
    if version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        for step in range(version, SCHEMA_VERSION):
            _run_script(conn, _MIGRATIONS[step])
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    return conn


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT first; statements one by one stay in the transaction.
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""


def load_or_create_salt(catalog_dir: str | Path) -> bytes:
    """The site's HMAC key, created (mode 0600) on first use.

    Raises:
        InputError: the salt file exists but is not 64 hex characters.
    """
    path = Path(catalog_dir) / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SALT_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent first index keeps one salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    text = path.read_text().strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != 32:
        raise InputError(f"{path} is not a valid site salt (64 hex characters); restore it from a backup "
                         "(deleting it gives every patient a new pseudonym)")
    return salt


def pseudonym(salt: bytes, kind: str, identifier: str) -> str:
    """HMAC-SHA256 of ``kind:identifier`` under the site salt, as 32 hex characters."""
    return hmac.new(salt, f"{kind}:{identifier}".encode(), sha256).hexdigest()[:32]


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``data.catalog.split_fractions`` (three non-negative values summing to 1)."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"data.catalog.split_fractions={list(values)} must be 3 non-negative "
                          "train/val/test fractions summing to 1")
    return values  # type: ignore[return-value]


def assign_splits(conn: sqlite3.Connection, fractions: Sequence[float]) -> None:
    """Give every new patient a split and copy each patient's split onto its series.

    A patient keeps the split it was first given. New patients, taken in
    pseudonym order (which no file name or arrival order influences), each go
    to the split whose count is furthest below ``fraction * patients``: a
    largest-remainder rule, so shares match the fractions as closely as whole
    patients allow even at a ten-patient site, where independent random draws
    often leave the validation or test split empty.

    Args:
        conn: catalog connection inside the caller's transaction.
        fractions: train/val/test fractions (see :func:`check_split_fractions`).
    """
    known = dict(conn.execute("SELECT patient_id, split FROM patients").fetchall())
    counts = Counter(known.values())
    present = {pid for (pid,) in conn.execute("SELECT DISTINCT patient_id FROM series")}
    new_rows = []
    for pid in sorted(present - known.keys()):
        total = sum(counts.values()) + 1
        deficit = [f * total - counts[name] for name, f in zip(SPLITS, fractions, strict=True)]
        # Largest deficit wins; on a tie the larger fraction, then the earlier split.
        best = max(range(len(SPLITS)), key=lambda i: (round(deficit[i], 9), fractions[i], -i))
        counts[SPLITS[best]] += 1
        new_rows.append((pid, SPLITS[best]))
    conn.executemany("INSERT INTO patients (patient_id, split) VALUES (?, ?)", new_rows)
    conn.execute("UPDATE series SET split = (SELECT split FROM patients WHERE patients.patient_id = series.patient_id)")


_JSON_COLUMNS = ("shape", "spacing", "meta", "label_findings", "source_paths", "settings")


def series_rows(conn: sqlite3.Connection, split: str | None = None) -> list[dict[str, Any]]:
    """Series rows as dicts (JSON columns decoded), ordered by id; one split or all."""
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    query = "SELECT * FROM series" + (" WHERE split = ?" if split else "") + " ORDER BY id"
    rows = []
    for row in conn.execute(query, (split,) if split else ()):
        item = dict(row)
        for col in _JSON_COLUMNS:
            item[col] = json.loads(item[col]) if item[col] is not None else None
        rows.append(item)
    return rows


def skipped_rows(conn: sqlite3.Connection) -> list[Skipped]:
    """Inputs the latest index run could not use, in the order it met them."""
    return [Skipped(r["path"], r["reason"]) for r in conn.execute("SELECT path, reason FROM skipped ORDER BY rowid")]


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts for ``fedmri data show``: by sequence, body region, vendor and split, and label coverage."""
    rows = series_rows(conn)

    def count(column: str) -> dict[str, int]:
        return dict(sorted(Counter(str(r[column] or "unknown") for r in rows).items()))

    last = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    return {
        "n_series": len(rows),
        "n_patients": len({r["patient_id"] for r in rows}),
        "by_sequence": count("sequence"),
        "by_body_region": count("body_region"),
        "by_vendor": count("vendor"),
        "by_split": {name: sum(r["split"] == name for r in rows) for name in SPLITS},
        "coverage": {
            "reports": sum(bool(r["report_findings"] or r["report_impression"]) for r in rows),
            "findings": sum(r["label_findings"] is not None for r in rows),
            "age": sum(r["age"] is not None for r in rows),
            "sex": sum(r["sex"] is not None for r in rows),
            "masks": sum(bool(r["has_mask"]) for r in rows),
        },
        "n_skipped": conn.execute("SELECT COUNT(*) FROM skipped").fetchone()[0],
        "last_index": {**dict(last), "settings": json.loads(last["settings"])} if last is not None else None,
    }


def show_document(conn: sqlite3.Connection) -> dict[str, Any]:
    """What ``fedmri data show --json`` prints: :func:`summary`, one entry per series and per skipped input.

    Series are named by their pseudonymous id only. Skipped inputs keep their
    path and reason: that list is the site admin's, for fixing the export.
    """
    return {
        **summary(conn),
        "series": [{"id": r["id"], "shape": r["shape"], "spacing": r["spacing"], "sequence": r["sequence"],
                    "body_region": r["body_region"], "vendor": r["vendor"], "split": r["split"]}
                   for r in series_rows(conn)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped_rows(conn)],
    }
