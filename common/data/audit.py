"""``fedmri data audit``: where a site catalog keeps identifiers, and a check that none is shown or sent.

A catalog holds protected health information at rest: DICOM UIDs, accession
numbers, file paths, report text, dates (:data:`COLUMNS` classifies every
column). What leaves it must not: ``fedmri data show`` prints counts and
pseudonymous series ids, and a site names series to the coordinator only by
their salted pseudonym (:func:`~fedmri.data.catalog_db.pseudonym`: HMAC-SHA256
under ``site.salt``, which never leaves the site), in search replies and in the
``meta`` of the samples its trainers see.

:func:`audit_catalog` collects every identifier value at rest, renders what
``data show --json`` prints and what a site would send (a search reply naming
every series, the samples' ``meta``), and looks for those values in it: equal
(values of 4 characters or more) or inside longer text (8 or more; not dates,
which an index date may repeat by chance, nor inside a pseudonym). It also
recomputes the series and study pseudonyms from the salt, and fails on a
column it cannot classify (a schema change must update :data:`COLUMNS`).
Findings name the field and the column whose value it holds, never the value.

``data show``'s list of skipped inputs names files and quotes UIDs on purpose:
it is the site admin's list of what to fix. It is counted as site-only, not checked.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmri.data.catalog_db import SALT_FILE, open_catalog, pseudonym, series_rows, show_document
from fedmri.protocol import search_reply

# table -> column -> (what it holds, description). "identifier": protected health information;
# "quasi": identifying in combination; "pseudonym": salted HMAC; "none": neither.
COLUMNS: dict[str, dict[str, tuple[str, str]]] = {
    "info": {"key": ("none", "catalog facts"), "value": ("none", "versions")},
    "files": {
        "path": ("identifier", "file path (folder names may hold names or IDs)"),
        "size": ("none", "bytes"), "mtime_ns": ("none", "file time"), "kind": ("none", "dicom, seg, nifti"),
        "header": ("identifier", "JSON DICOM header: PatientID, AccessionNumber, Study/Series/SOP UIDs, path"),
        "skip_reason": ("identifier", "free text; may quote UIDs"),
    },
    "series": {
        "id": ("pseudonym", "series pseudonym: the only series name shown or sent"),
        "series_uid": ("identifier", "SeriesInstanceUID"),
        "patient_id": ("pseudonym", "patient pseudonym"), "study_id": ("pseudonym", "study pseudonym"),
        "study_uid": ("identifier", "StudyInstanceUID"), "accession": ("identifier", "AccessionNumber"),
        "split": ("none", "train/val/test"), "sequence": ("none", "sequence family"),
        "body_region": ("none", "region"), "vendor": ("none", "manufacturer"), "plane": ("none", "plane"),
        "shape": ("none", "voxels"), "spacing": ("none", "mm"),
        "meta": ("identifier", "JSON: Series/Study UIDs, AccessionNumber, StudyDate, descriptions"),
        "report_findings": ("identifier", "report text"), "report_impression": ("identifier", "report text"),
        "label_findings": ("none", "finding codes"),
        "age": ("quasi", "age in years"), "sex": ("quasi", "sex"),
        "mask_source": ("identifier", "mask file path"), "mask_stat": ("identifier", "mask file path, size, time"),
        "source_kind": ("none", "dicom, nifti, bids"), "source_paths": ("identifier", "file paths"),
        "files_digest": ("none", "sha256 of paths, sizes and file times: not reversible"),
        "settings": ("none", "preprocessing"), "settings_digest": ("none", "sha256"),
        "cache_key": ("none", "sha256 of voxels and settings"), "cache_path": ("none", "cache/<key>.npz"),
        "has_mask": ("none", "0/1"), "indexed_at": ("none", "when indexed"),
    },
    "patients": {"patient_id": ("pseudonym", "patient pseudonym"), "split": ("none", "train/val/test")},
    "failed_series": {
        "series_uid": ("identifier", "SeriesInstanceUID"), "files_digest": ("none", "sha256"),
        "reader": ("none", "fedmri version"), "path": ("identifier", "file path"),
        "reason": ("identifier", "free text; quotes the series UID"),
    },
    "skipped": {"path": ("identifier", "input path"), "reason": ("identifier", "free text; may quote UIDs"),
                "run_id": ("none", "run")},
    "runs": {name: ("none", "run history") for name in ("id", "started_at", "finished_at", "n_series", "n_loaded",
                                                        "n_preprocessed", "n_skipped", "settings")},
}
# Identifier values looked for in what is shown or sent: JSON columns give these keys (or all strings).
_JSON_KEYS = {
    ("files", "header"): ("path", "patient_id", "accession_number", "study_instance_uid", "series_instance_uid",
                          "sop_instance_uid"),
    ("series", "meta"): ("series_instance_uid", "study_instance_uid", "accession_number", "study_date"),
}
_SEARCHED = {("files", "path"), ("series", "series_uid"), ("series", "study_uid"), ("series", "accession"),
             ("series", "report_findings"), ("series", "report_impression"), ("series", "mask_source"),
             ("series", "mask_stat"), ("series", "source_paths"), ("failed_series", "series_uid"),
             ("failed_series", "path"), ("skipped", "path"), *_JSON_KEYS}
_EQUAL_ONLY = {"study_date"}  # JSON keys whose values are looked for whole only
MIN_EQUAL, MIN_INSIDE = 4, 8
_HEX32 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Column:
    """One column of the catalog: ``holds`` is identifier, quasi, pseudonym or none; ``n_values`` non-empty."""

    table: str
    column: str
    holds: str
    what: str
    n_values: int


@dataclass(frozen=True)
class Finding:
    """Something shown or sent that carries an identifier (``where``: surface and field), or a catalog fault."""

    where: str
    problem: str


@dataclass
class AuditReport:
    """Columns at rest, values checked per surface, site-only values, and findings (none when clean)."""

    columns: list[Column]
    checked: dict[str, int] = field(default_factory=dict)
    site_only: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0


def audit_catalog(catalog_dir: str | Path) -> AuditReport:
    """Audit a site catalog (read only). Raises :class:`InputError` when there is no catalog."""
    catalog_dir = Path(catalog_dir)
    conn = open_catalog(catalog_dir)
    try:
        report = AuditReport(columns=_columns(conn))
        report.findings += [Finding(f"catalog column {c.table}.{c.column}", "is not classified in "
                                    "fedmri.data.audit.COLUMNS; say there whether it holds identifiers")
                            for c in report.columns if c.holds == "unclassified"]
        needles = _identifier_values(conn)
        document = show_document(conn)
        rows = series_rows(conn)
    finally:
        conn.close()
    skipped = document.pop("skipped")
    report.site_only["data show: skipped inputs (paths, reasons)"] = len(skipped)
    report.checked["data show / --json"] = _scan(document, "data show --json", needles, report.findings)

    from fedmri.data.dataset import SeriesDataset  # torch: only for the audit's last part

    metas = [row["meta"] for row in SeriesDataset(catalog_dir, None).rows]
    sent = {"search reply": search_reply([m["series_id"] for m in metas], [0.0] * len(metas)), "sample meta": metas}
    report.checked["sent to the coordinator"] = _scan(sent, "sent", needles, report.findings)
    report.findings += _check_pseudonyms(catalog_dir, rows, metas)
    return report


def _columns(conn: sqlite3.Connection) -> list[Column]:
    out = []
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid").fetchall():
        for info in conn.execute(f"PRAGMA table_info({table})").fetchall():
            holds, what = COLUMNS.get(table, {}).get(info["name"], ("unclassified", "?"))
            n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {info['name']} IS NOT NULL "
                             f"AND {info['name']} != ''").fetchone()[0]
            out.append(Column(table, info["name"], holds, what, n))
    return out


@dataclass
class _Needles:
    """Identifier values at rest -> the columns holding each: looked for whole, or also inside text."""

    whole: dict[str, set[str]] = field(default_factory=dict)
    inside: dict[str, set[str]] = field(default_factory=dict)


def _identifier_values(conn: sqlite3.Connection) -> _Needles:
    """Every identifier value at rest worth looking for."""
    found = _Needles()
    for table, column in sorted(_SEARCHED):
        for (value,) in conn.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"):
            for key, text in _strings(value, _JSON_KEYS.get((table, column))):
                for item in (text, text.partition("#")[0]):  # a volume "UID#e1" and its series UID
                    if len(item) >= MIN_EQUAL:
                        found.whole.setdefault(item, set()).add(f"{table}.{column}")
                    if len(item) >= MIN_INSIDE and key not in _EQUAL_ONLY:
                        found.inside.setdefault(item, set()).add(f"{table}.{column}")
    return found


def _strings(value: Any, keys: tuple[str, ...] | None) -> Iterator[tuple[str, str]]:
    """``(JSON key or "", text)`` of a column value: the given keys of a JSON object, the strings of a list."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, dict):
        yield from ((k, str(value[k])) for k in keys or value if value.get(k) not in (None, ""))
    elif isinstance(value, list):
        yield from (("", v) for v in value if isinstance(v, str))
    elif value is not None:
        yield "", str(value)


def _scan(document: Any, surface: str, needles: _Needles, findings: list[Finding], where: str = "") -> int:
    """Look for ``needles`` in every key and string of ``document``; returns the number of strings checked."""
    if isinstance(document, dict):
        total = 0
        for key, value in document.items():
            total += _scan(str(key), surface, needles, findings, f"{where} (a key)" if where else "(a top key)")
            total += _scan(value, surface, needles, findings, f"{where}.{key}" if where else str(key))
        return total
    if isinstance(document, list):
        return sum(_scan(v, surface, needles, findings, f"{where}[{i}]") for i, v in enumerate(document))
    if not isinstance(document, str):
        return 0
    source = needles.whole.get(document)
    if source is None and not _HEX32.fullmatch(document):  # a pseudonym is checked by recomputing it
        source = _inside(document, needles.inside)
    if source is not None:
        findings.append(Finding(f"{surface}: {where}", f"holds a value of {', '.join(sorted(source))}"))
    return 1


def _inside(text: str, needles: dict[str, set[str]]) -> set[str] | None:
    """The columns of an identifier of MIN_INSIDE+ characters found inside ``text``, or None."""
    if len(text) > 512:
        return next((src for n, src in needles.items() if len(n) >= MIN_INSIDE and n in text), None)
    for start in range(len(text) - MIN_INSIDE + 1):
        for end in range(len(text), start + MIN_INSIDE - 1, -1):  # the longest: a series UID, not its study's
            source = needles.get(text[start:end])
            if source is not None:
                return source
    return None


def _check_pseudonyms(catalog_dir: Path, rows: list[dict[str, Any]], metas: list[dict[str, Any]]) -> list[Finding]:
    """Series and study ids are the salted HMACs of their UIDs; patient ids look like one; the ids sent are those."""
    salt_file = catalog_dir / SALT_FILE
    try:
        salt = bytes.fromhex(salt_file.read_text().strip())
    except (OSError, ValueError):
        return [Finding(str(salt_file), "missing or unreadable: the pseudonyms cannot be checked (restore it from "
                                        "a backup; a new salt gives every patient a new pseudonym)")]
    findings = []
    for i, row in enumerate(rows):
        if row["id"] != pseudonym(salt, "series", row["series_uid"]):
            findings.append(Finding(f"catalog series[{i}].id", "is not the salted pseudonym of its series UID"))
        if row["study_id"] != pseudonym(salt, "study", row["study_uid"] or row["series_uid"]):
            findings.append(Finding(f"catalog series[{i}].study_id", "is not the salted pseudonym of its study UID"))
        if not _HEX32.fullmatch(row["patient_id"]):
            findings.append(Finding(f"catalog series[{i}].patient_id", "is not a pseudonym (32 hex characters)"))
    if sorted(m["series_id"] for m in metas) != sorted(r["id"] for r in rows):
        findings.append(Finding("sent: search reply ids", "are not the catalog's series pseudonyms"))
    return findings


__all__ = ["COLUMNS", "AuditReport", "Column", "Finding", "audit_catalog"]
