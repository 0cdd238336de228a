"""``fedmri data index``: register a site's series in its catalog, incrementally and atomically.

One run is one SQLite transaction: killed or interrupted, it leaves the catalog
exactly as it was, and the next run completes the work, reusing every cache
entry already written (entries are content addressed and written atomically).
Files whose size and mtime are unchanged are not opened again; series whose
files, mask and preprocessing settings are unchanged are not read again.
The catalog mirrors the inputs of the latest run: a series no longer found (or
no longer readable) leaves it, and the reason is listed.

Test-only hook: with ``FEDMRI_TEST_HANG_AFTER_SERIES=N`` in the environment, the
run prints ``fedmri-test-hook: hanging after N series`` on stderr after the N-th
series it reads and then sleeps, so a test can kill it mid-transaction at a
known point. Never set it in production.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from fedmri import __version__
from fedmri.config import load_config
from fedmri.data.catalog_db import (
    CACHE_DIR,
    assign_splits,
    check_split_fractions,
    load_or_create_salt,
    open_catalog,
)
from fedmri.data.dicom import DicomHeader, Skipped, SkipInput, find_files, group_series, read_header
from fedmri.data.preprocess import PreprocessSettings, Preprocessor, VolumeCache
from fedmri.data.series_job import SeriesJob, SeriesOutcome, process_job
from fedmri.data.site_inputs import LabelRow, ReportRow, read_labels, read_reports
from fedmri.errors import InputError

HANG_ENV = "FEDMRI_TEST_HANG_AFTER_SERIES"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class IndexProgress(Protocol):
    """What the indexer reports while it works (the CLI draws rich bars from it)."""

    def start(self, stage: str, total: int) -> None: ...

    def advance(self, stage: str) -> None: ...


class _Silent:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str) -> None:
        pass


@dataclass
class IndexResult:
    """What one index run did.

    Attributes:
        n_series: series in the catalog after the run.
        n_loaded: series read from disk (new or changed); the rest were unchanged.
        n_preprocessed: series preprocessed (cache misses).
        n_headers_read: files whose header was read (new or changed files).
        bytes_loaded: bytes of the source files of the series read.
        skipped: every input not used, with its reason.
    """

    catalog_dir: Path
    n_files: int = 0
    n_headers_read: int = 0
    n_series: int = 0
    n_loaded: int = 0
    n_preprocessed: int = 0
    bytes_loaded: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every input was used, 3 when some were skipped."""
        return 3 if self.skipped else 0


def index_site(
    dicom_root: str | Path,
    reports: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    nifti: str | Path | None = None,
    cfg: DictConfig | None = None,
    progress: IndexProgress | None = None,
) -> IndexResult:
    """Index a site's DICOM (and NIfTI) series with their reports and labels.

    Args:
        dicom_root: folder searched recursively; file names do not matter.
        reports: ``reports.csv`` (see :func:`fedmri.data.site_inputs.read_reports`).
        out: catalog folder: ``catalog.sqlite``, ``cache/``, ``site.salt``.
        labels: optional ``labels.csv``.
        nifti: optional folder of ``.nii``/``.nii.gz`` series; each file is a
            series whose id for labels.csv is its path relative to this folder
            without the suffix, and, lacking a PatientID, its own patient.
        cfg: resolved config (``data.preprocess``, ``data.catalog``); default: the ``tiny`` preset.
        progress: optional progress sink.

    Returns:
        What was done, including every skipped input.

    Raises:
        InputError / ConfigError: bad arguments or unreadable CSV; nothing is changed.
    """
    cfg = cfg if cfg is not None else load_config("tiny")
    settings = PreprocessSettings.from_config(cfg.data.preprocess)
    fractions = check_split_fractions(cfg.data.catalog.split_fractions)
    dicom_root, out = Path(dicom_root), Path(out)
    for folder, what in ((dicom_root, "DICOM folder"), (nifti, "--nifti folder")):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{what} {folder} does not exist or is not a folder")
    if out.resolve() == dicom_root.resolve():
        raise InputError(f"--out {out} is the DICOM folder itself; give the catalog its own folder")
    report_rows, skipped = read_reports(reports)
    label_rows, label_skips = read_labels(labels) if labels is not None else ([], [])
    progress = progress or _Silent()

    salt = load_or_create_salt(out)
    conn = open_catalog(out, create=True)
    result = IndexResult(catalog_dir=out)
    started = _now()
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            raise InputError(f"catalog {out} is busy ({exc}); is another `fedmri data index` running on it?") from None
        try:
            jobs = _scan(conn, dicom_root, nifti, out, result, skipped, progress)
            indexed = _process(conn, jobs, out, settings, salt, label_rows, result, skipped, progress)
            assign_splits(conn, fractions)
            skipped += _join_reports(conn, report_rows, reports)
            skipped += label_skips + _join_labels(label_rows, indexed, labels)
            result.skipped = skipped
            result.n_series = conn.execute("SELECT COUNT(*) FROM series").fetchone()[0]
            _record_run(conn, started, result, settings)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scan(conn: Any, dicom_root: Path, nifti: Path | None, out: Path, result: IndexResult,
          skipped: list[Skipped], progress: IndexProgress) -> list[SeriesJob]:
    """Stat every file, read the headers of new or changed ones, group into series jobs."""
    # The catalog (and a --nifti folder) may sit inside the DICOM folder: never scan it as DICOM.
    todo = [(p, "dicom") for p in _files_outside(dicom_root, [out] + ([nifti] if nifti else []))]
    todo += [(p, "nifti") for p in _files_outside(nifti, [out])] if nifti else []
    known = {r["path"]: r for r in conn.execute("SELECT * FROM files")}
    seen: set[str] = set()
    headers: list[DicomHeader] = []
    nifti_jobs: list[SeriesJob] = []
    progress.start("files", len(todo))
    for path, kind in todo:
        key = str(path)
        progress.advance("files")
        try:
            st = path.stat()
        except OSError as exc:  # removed or unreadable between the listing and now
            skipped.append(Skipped(key, f"cannot stat file: {exc.strerror}"))
            continue
        seen.add(key)
        row = known.get(key)
        if row is not None and (row["size"], row["mtime_ns"], row["kind"]) == (st.st_size, st.st_mtime_ns, kind):
            header, reason = (json.loads(row["header"]) if row["header"] else None), row["skip_reason"]
        else:
            header, reason = _read_file(path, kind)
            result.n_headers_read += 1
            conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                         (key, st.st_size, st.st_mtime_ns, kind, json.dumps(header) if header else None, reason))
        if reason is not None:
            skipped.append(Skipped(key, reason))
        elif kind == "dicom":
            headers.append(DicomHeader(**header))
        else:
            uid = str(path.relative_to(nifti)).removesuffix(".gz").removesuffix(".nii")
            nifti_jobs.append(SeriesJob.from_files(uid, "nifti", [header], patient="", study="", accession=""))
    result.n_files = len(seen)
    conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in known if p not in seen])
    series, duplicates = group_series(headers)
    skipped += duplicates
    jobs = [SeriesJob.from_dicom(uid, members) for uid, members in series.items()]
    return jobs + nifti_jobs


def _files_outside(root: Path, folders: list[Path]) -> list[Path]:
    """``find_files(root)`` less anything inside ``folders`` (string prefixes: no per-file realpath)."""
    real_root = root.resolve()
    prefixes = tuple(str(root / Path(f).resolve().relative_to(real_root)) + os.sep
                     for f in folders if Path(f).resolve().is_relative_to(real_root))
    return [p for p in find_files(root) if not prefixes or not str(p).startswith(prefixes)]


def _read_file(path: Path, kind: str) -> tuple[dict[str, Any] | None, str | None]:
    if kind == "nifti":
        if not path.name.endswith(NIFTI_SUFFIXES):
            return None, "not a NIfTI file (.nii or .nii.gz)"
        st = path.stat()
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, None
    try:
        return asdict(read_header(path)), None
    except SkipInput as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a site's index
        return None, f"cannot be read ({type(exc).__name__}: {exc}); please report this file to fedmri"


def _process(conn: Any, jobs: list[SeriesJob], out: Path, settings: PreprocessSettings,
             salt: bytes, label_rows: list[LabelRow],
             result: IndexResult, skipped: list[Skipped], progress: IndexProgress) -> set[str]:
    """Bring every series row up to date; returns the series UIDs now in the catalog."""
    labels = {row.series_instance_uid: row for row in label_rows}
    existing = {r["series_uid"]: r for r in conn.execute("SELECT * FROM series")}
    failed = {r["series_uid"]: r for r in conn.execute("SELECT * FROM failed_series")}
    conn.execute("DELETE FROM failed_series")
    cache = VolumeCache(out / CACHE_DIR)
    preprocessor = Preprocessor(settings)
    hang_after = int(os.environ.get(HANG_ENV, "0") or 0)
    indexed: set[str] = set()
    progress.start("series", len(jobs))
    for job in sorted(jobs, key=lambda j: j.uid):
        outcome: SeriesOutcome = process_job(job, existing.get(job.uid), failed.get(job.uid), labels.get(job.uid),
                                             settings, salt, cache, preprocessor, out)
        skipped += outcome.skipped
        if outcome.row is not None:
            indexed.add(job.uid)
            _upsert(conn, "series", outcome.row)
        if outcome.failure is not None:
            skipped.append(outcome.failure)
            _upsert(conn, "failed_series", {"series_uid": job.uid, "files_digest": job.digest, "reader": __version__,
                                            "path": outcome.failure.path, "reason": outcome.failure.reason})
        result.n_loaded += outcome.loaded
        result.n_preprocessed += outcome.preprocessed
        result.bytes_loaded += job.n_bytes if outcome.loaded else 0
        progress.advance("series")
        if outcome.loaded and hang_after and result.n_loaded == hang_after:
            print(f"fedmri-test-hook: hanging after {hang_after} series", file=sys.stderr, flush=True)
            time.sleep(3600)
    gone = [(uid,) for uid in existing if uid not in indexed]
    conn.executemany("DELETE FROM series WHERE series_uid = ?", gone)
    return indexed


def _upsert(conn: Any, table: str, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", list(row.values()))


def _join_reports(conn: Any, rows: list[ReportRow], reports: str | Path) -> list[Skipped]:
    """Attach report text to series by AccessionNumber, else StudyInstanceUID; list reports that match nothing."""
    by_accession = {r.accession_number: r for r in rows if r.accession_number}
    by_study = {r.study_instance_uid: r for r in rows if r.study_instance_uid}
    used: set[int] = set()
    updates = []
    for series_id, accession, study in conn.execute("SELECT id, accession, study_uid FROM series").fetchall():
        report = (by_accession.get(accession) if accession else None) or by_study.get(study)
        if report is not None:
            used.add(report.line)
        updates.append((report.findings if report else None, report.impression if report else None, series_id))
    conn.executemany("UPDATE series SET report_findings = ?, report_impression = ? WHERE id = ?", updates)
    return [
        Skipped(f"{reports}:{r.line}", f"report for accession {r.accession_number or '-'} / study "
                f"{r.study_instance_uid or '-'} matches no indexed series; check the IDs or the DICOM folder")
        for r in rows if r.line not in used
    ]


def _join_labels(rows: list[LabelRow], indexed: Iterable[str], labels: str | Path | None) -> list[Skipped]:
    known = set(indexed)
    return [
        Skipped(f"{labels}:{r.line}", f"labels for series {r.series_instance_uid}, which is not in the catalog "
                "(not found, or skipped above); check the SeriesInstanceUID")
        for r in rows if r.series_instance_uid not in known
    ]


def _record_run(conn: Any, started: str, result: IndexResult, settings: PreprocessSettings) -> None:
    cursor = conn.execute(
        "INSERT INTO runs (started_at, finished_at, n_series, n_loaded, n_preprocessed, n_skipped, settings) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (started, _now(), result.n_series, result.n_loaded, result.n_preprocessed, len(result.skipped),
         json.dumps(settings.as_dict())),
    )
    conn.execute("DELETE FROM skipped")
    conn.executemany("INSERT INTO skipped (path, reason, run_id) VALUES (?, ?, ?)",
                     [(s.path, s.reason, cursor.lastrowid) for s in result.skipped])
