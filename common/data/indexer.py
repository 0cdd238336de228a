"""``fedmri data index``: register a site's series in its catalog, incrementally and atomically.

One run is one SQLite transaction: killed or interrupted, it leaves the catalog
exactly as it was, and the next run completes the work, reusing every cache
entry already written (entries are content addressed and written atomically).
Files whose size and mtime are unchanged are not opened again; series whose
files, mask and preprocessing settings are unchanged are not read again.
The catalog mirrors the inputs of the latest run: a series no longer found (or
no longer readable) leaves it, and the reason is listed.

Test-only hook: with ``FEDMRI_TEST_HANG_AFTER_SERIES=N`` in the environment, the
run prints ``fedmri-test-hook: hanging after N series`` (and its workers'
process ids) on stderr after the N-th series it reads and then sleeps, so a
test can kill it mid-transaction at a known point. Never set it in production.

With ``workers`` > 1, headers and series are read by worker processes
(:mod:`fedmri.data.index_pool`); their results are used in the order of a
one-process run, and every catalog write stays in this process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from fedmri import __version__
from fedmri.config import load_config
from fedmri.data.catalog_db import (
    assign_splits,
    check_split_fractions,
    load_or_create_salt,
    open_catalog,
)
from fedmri.data.bids import BidsScan, apply_meta, is_bids_dataset, scan_bids
from fedmri.data.dicom import DicomHeader, Skipped, SkipInput, find_files, group_series, read_header
from fedmri.data.dicomdir import DICOMDIR_NAME, is_dicomdir, read_dicomdir, select_listed
from fedmri.data.index_pool import IndexPool
from fedmri.data.masks import SegHeader, read_seg_header
from fedmri.data.preprocess import PreprocessSettings
from fedmri.data.selection import SelectionSettings
from fedmri.data.series_job import SeriesJob, process_job, reuse_outcome
from fedmri.data.site_inputs import LabelRow, ReportRow, merge_labels, read_labels, read_reports
from fedmri.errors import InputError

HANG_ENV = "FEDMRI_TEST_HANG_AFTER_SERIES"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Bump when _read_file gives another answer for the same file, so cached headers and skip
# reasons of the files table are read again once (2: DICOM SEG and DICOMDIR recognised).
SCAN_VERSION = 2
# With workers=0 (auto), the least work worth starting worker processes for: a header read costs
# ~1.5 ms and a series ~0.1 s of one core, the start one import of torch and MONAI (~3-8 s).
_AUTO_MIN_FILES = 4000
_AUTO_MIN_SERIES = 64
# What the files table may say of a file found in each role ("kind" column).
_STORED_KINDS = {"dicom": ("dicom", "seg", "dicomdir"), "nifti": ("nifti",)}


class IndexProgress(Protocol):
    """What the indexer reports while it works (the CLI draws rich bars, or lines in a log file, from it)."""

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
        seconds: wall time of the ``"files"`` (scan) and ``"series"`` (read, preprocess) stages.
    """

    catalog_dir: Path
    n_files: int = 0
    n_headers_read: int = 0
    n_series: int = 0
    n_loaded: int = 0
    n_preprocessed: int = 0
    bytes_loaded: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

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
    bids: str | Path | None = None,
    cfg: DictConfig | None = None,
    progress: IndexProgress | None = None,
    workers: int = 1,
) -> IndexResult:
    """Index a site's DICOM (NIfTI, BIDS) series with their reports and labels.

    DICOM SEG files among the DICOM files give the mask of the series they
    reference (unless labels.csv names one); a folder holding a ``DICOMDIR``
    is read through it (:mod:`fedmri.data.dicomdir`).

    Args:
        dicom_root: folder searched recursively, flat or nested; file names do
            not matter. May be a ``DICOMDIR`` file (its folder is indexed) or a
            BIDS dataset (then read as ``bids``).
        reports: ``reports.csv`` (see :func:`fedmri.data.site_inputs.read_reports`).
        out: catalog folder: ``catalog.sqlite``, ``cache/``, ``site.salt``.
        labels: optional ``labels.csv``.
        nifti: optional folder of ``.nii``/``.nii.gz`` series; each file is a
            series whose id for labels.csv is its path relative to this folder
            without the suffix, and, lacking a PatientID, its own patient.
        bids: optional BIDS dataset (:mod:`fedmri.data.bids`); series ids are
            image names without extension, e.g. ``sub-01_ses-01_T1w``.
        cfg: resolved config (``data.preprocess``, ``data.catalog``); default: the ``tiny`` preset.
        progress: optional progress sink.
        workers: processes that read headers and series; 1 = this process only;
            0 = one per usable CPU core (at most 8) once there are enough files
            or series to pay for starting them (``fedmri data index``'s default).
            The results do not depend on it.

    Returns:
        What was done, including every skipped input.

    Raises:
        InputError / ConfigError: bad arguments or unreadable CSV; nothing is changed.
    """
    cfg = cfg if cfg is not None else load_config("tiny")
    pool = IndexPool(workers)
    settings = PreprocessSettings.from_config(cfg.data.preprocess)
    selection = SelectionSettings.from_config(cfg.data.index)
    fractions = check_split_fractions(cfg.data.catalog.split_fractions)
    dicom_root, out = Path(dicom_root), Path(out)
    if dicom_root.is_file():
        if not is_dicomdir(dicom_root):
            raise InputError(f"DICOM folder {dicom_root} is a file; give the folder of the export, or its DICOMDIR")
        dicom_root = dicom_root.parent
    for folder, what in ((dicom_root, "DICOM folder"), (nifti, "--nifti folder"), (bids, "--bids dataset")):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{what} {folder} does not exist or is not a folder")
    if bids is not None and not is_bids_dataset(bids):
        raise InputError(f"--bids dataset {bids} has no dataset_description.json; give the dataset's root folder")
    bids = Path(bids) if bids is not None else dicom_root if is_bids_dataset(dicom_root) else None
    if out.resolve() == dicom_root.resolve():
        raise InputError(f"--out {out} is the DICOM folder itself; give the catalog its own folder")
    if bids is not None and out.resolve() == bids.resolve():
        raise InputError(f"--out {out} is the BIDS dataset itself; give the catalog its own folder")
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
            label_masks = [row.mask for row in label_rows if row.mask is not None]
            jobs, segs = _scan(conn, dicom_root, nifti, out, result, skipped, progress, selection, pool,
                               bids=bids, label_masks=label_masks)
            found = scan_bids(bids, _files_outside(bids, [out], label_masks)) if bids is not None else BidsScan()
            jobs, collisions = _unique_ids(jobs + found.jobs)
            skipped += found.skipped + collisions
            result.n_files += found.n_files
            # Labels by series: labels.csv, then what the data says (participants.tsv, SEG files).
            by_uid = {row.series_instance_uid: row for row in label_rows}
            for row in found.labels:
                by_uid[row.series_instance_uid] = merge_labels(by_uid.get(row.series_instance_uid), row)
            attached, seg_skips = _attach_segs(segs, by_uid, {job.uid for job in jobs})
            indexed = _process(conn, jobs, out, settings, salt, by_uid, found.meta, result, skipped, progress, pool)
            skipped += seg_skips + [Skipped(path, f"DICOM SEG of series {uid}, which is not in the catalog "
                                                  "(skipped above)") for uid, path in attached.items()
                                    if uid not in indexed]
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
        pool.close()
        conn.close()
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scan(conn: Any, dicom_root: Path, nifti: Path | None, out: Path, result: IndexResult,
          skipped: list[Skipped], progress: IndexProgress, selection: SelectionSettings, pool: IndexPool, *,
          bids: Path | None = None, label_masks: Iterable[Path] = ()) -> tuple[list[SeriesJob], list[SegHeader]]:
    """Stat every file, read the headers of new or changed ones, group into series jobs.

    Returns:
        The DICOM and NIfTI series jobs, and the DICOM SEG files found among the DICOM files.
    """
    # The catalog, --nifti and --bids folders may sit inside the DICOM folder: never scan them as DICOM.
    # Masks named in labels.csv are read as masks, not as series.
    dicom_files = _files_outside(dicom_root, [out] + [f for f in (nifti, bids) if f], label_masks)
    nifti_files = _files_outside(nifti, [out], label_masks) if nifti else []
    version = f"{__version__}/{SCAN_VERSION}"
    stored = conn.execute("SELECT value FROM info WHERE key = 'scan_version'").fetchone()
    stale = stored is None or stored[0] != version
    known = {} if stale else {r["path"]: r for r in conn.execute("SELECT * FROM files")}
    seen: set[str] = set()
    read: list[tuple[str, dict[str, Any]]] = []  # (kind, header) of every file used
    # DICOMDIRs first: each decides which files of its folder are read.
    file_sets: dict[Path, list[str]] = {}
    for path in [p for p in dicom_files if p.name.upper() == DICOMDIR_NAME]:
        got = _read_cached(conn, known.get(str(path)), path, "dicom", result, seen, skipped)
        if got is not None and got[0] == "dicomdir":
            file_sets[path] = got[1]["listed"]
        elif got is not None:
            read.append(got)  # a file named DICOMDIR that is something else after all
    others = [p for p in dicom_files if p.name.upper() != DICOMDIR_NAME]
    to_read, unlisted, missing = select_listed(others, file_sets)
    skipped += unlisted + missing
    todo = [(p, "dicom") for p in to_read] + [(p, "nifti") for p in nifti_files]
    started = time.perf_counter()
    read += _read_all(conn, known, todo, result, seen, skipped, progress, pool)
    result.seconds["files"] = time.perf_counter() - started
    headers: list[DicomHeader] = []
    nifti_jobs: list[SeriesJob] = []
    segs: list[SegHeader] = []
    for kind, header in read:
        if kind == "dicom":
            headers.append(DicomHeader(**header))
        elif kind == "seg":
            segs.append(SegHeader(header["path"], header["sop_instance_uid"], tuple(header["referenced_series"])))
        elif kind == "nifti":
            uid = str(Path(header["path"]).relative_to(nifti)).removesuffix(".gz").removesuffix(".nii")
            nifti_jobs.append(SeriesJob.from_files(uid, "nifti", [header], patient="", study="", accession=""))
    result.n_files = len(seen) + len(unlisted)
    conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in known if p not in seen])
    conn.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('scan_version', ?)", (version,))
    series, duplicates = group_series(headers, selection)
    skipped += duplicates
    jobs = [SeriesJob.from_dicom(uid, members) for uid, members in series.items()]
    return jobs + nifti_jobs, segs


def _read_cached(conn: Any, row: Any, path: Path, role: str, result: IndexResult, seen: set[str],
                 skipped: list[Skipped]) -> tuple[str, dict[str, Any]] | None:
    """``(kind, header)`` of one file found in ``role``; ``None``, with the reason listed, if it is not used.

    Read from the files table when the file's size and mtime are unchanged, else
    from the file, and stored. ``kind`` is the role's or, for DICOM files,
    ``"seg"`` or ``"dicomdir"``.
    """
    key = str(path)
    try:
        st = path.stat()
    except OSError as exc:  # removed or unreadable between the listing and now
        skipped.append(Skipped(key, f"cannot stat file: {exc.strerror}"))
        return None
    seen.add(key)
    stored = _stored(row, st, role)
    if stored is not None:
        kind, header, reason = stored
    else:
        kind, header, reason = _read_file(path, role)
        result.n_headers_read += 1
        conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                     (key, st.st_size, st.st_mtime_ns, kind, json.dumps(header) if header else None, reason))
    if reason is not None:
        skipped.append(Skipped(key, reason))
        return None
    return kind, header


def _read_all(conn: Any, known: Mapping[str, Any], todo: list[tuple[Path, str]], result: IndexResult,
              seen: set[str], skipped: list[Skipped], progress: IndexProgress,
              pool: IndexPool) -> list[tuple[str, dict[str, Any]]]:
    """:func:`_read_cached` over ``todo`` (``(path, role)``), the new or changed files read by ``pool``.

    Results, files-table writes and skip reasons come in ``todo`` order, whatever the pool's size.
    """
    progress.start("files", len(todo))
    found: list[tuple[os.stat_result | str, Any]] = []  # (stat or why not, stored answer or None)
    fresh: list[tuple[Path, str]] = []
    for path, role in todo:
        try:
            st = path.stat()
        except OSError as exc:  # removed or unreadable between the listing and now
            found.append((f"cannot stat file: {exc.strerror}", None))
            continue
        stored = _stored(known.get(str(path)), st, role)
        found.append((st, stored))
        if stored is None:
            fresh.append((path, role))
    reads = pool.map(_read_file, fresh, chunksize=max(1, min(64, len(fresh) // (8 * pool.workers))),
                     auto_min=_AUTO_MIN_FILES)
    used = []
    for (path, _role), (st, stored) in zip(todo, found, strict=True):
        progress.advance("files")
        key = str(path)
        if isinstance(st, str):
            skipped.append(Skipped(key, st))
            continue
        seen.add(key)
        if stored is None:
            stored = next(reads)
            result.n_headers_read += 1
            kind, header, reason = stored
            conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                         (key, st.st_size, st.st_mtime_ns, kind, json.dumps(header) if header else None, reason))
        kind, header, reason = stored
        if reason is not None:
            skipped.append(Skipped(key, reason))
        else:
            used.append((kind, header))
    return used


def _stored(row: Any, st: os.stat_result, role: str) -> tuple[str, dict[str, Any] | None, str | None] | None:
    """``(kind, header, skip reason)`` from the files table when the file is unchanged since; else ``None``."""
    if row is None or (row["size"], row["mtime_ns"]) != (st.st_size, st.st_mtime_ns) \
            or row["kind"] not in _STORED_KINDS[role]:
        return None
    return row["kind"], (json.loads(row["header"]) if row["header"] else None), row["skip_reason"]


def _files_outside(root: Path, folders: list[Path], files: Iterable[Path] = ()) -> list[Path]:
    """``find_files(root)`` less anything inside ``folders`` and ``files`` (string prefixes: no per-file realpath)."""
    real_root = root.resolve()
    inside = [Path(f).resolve() for f in folders]
    prefixes = tuple(str(root / f.relative_to(real_root)) + os.sep for f in inside if f.is_relative_to(real_root))
    exact = {str(root / f.relative_to(real_root)) for f in (Path(f).resolve() for f in files)
             if f.is_relative_to(real_root)}
    return [p for p in find_files(root)
            if (not prefixes or not str(p).startswith(prefixes)) and str(p) not in exact]


def _read_file(path: Path, role: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """``(kind, header, skip reason)`` of one file found as ``role`` ("dicom" or "nifti")."""
    if role == "nifti":
        if not path.name.endswith(NIFTI_SUFFIXES):
            return role, None, "not a NIfTI file (.nii or .nii.gz)"
        st = path.stat()
        return role, {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, None
    if path.name.upper() == DICOMDIR_NAME and is_dicomdir(path):
        try:
            return "dicomdir", {"path": str(path), "listed": read_dicomdir(path)}, None
        except InputError as exc:
            return "dicomdir", None, f"{exc}; the files of its folder were read one by one instead"
    try:
        return role, asdict(read_header(path)), None
    except SkipInput as exc:
        seg = read_seg_header(path)  # a segmentation: attached to the series it references
        if seg is not None:
            return "seg", asdict(seg), None
        reason = str(exc)
        if path.name.endswith(NIFTI_SUFFIXES):
            reason += "; index NIfTI files with --nifti FOLDER, or a BIDS dataset with --bids FOLDER"
        return role, None, reason
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a site's index
        return role, None, f"cannot be read ({type(exc).__name__}: {exc}); please report this file to fedmri"


def _process(conn: Any, jobs: list[SeriesJob], out: Path, settings: PreprocessSettings,
             salt: bytes, labels: Mapping[str, LabelRow], extra_meta: Mapping[str, Mapping[str, Any]],
             result: IndexResult, skipped: list[Skipped], progress: IndexProgress, pool: IndexPool) -> set[str]:
    """Bring every series row up to date; returns the series UIDs now in the catalog.

    ``labels`` are by series id; ``extra_meta`` is metadata found beside a
    series' files (BIDS sidecars), laid over what its files say. Series that
    changed are read by ``pool``; rows are written here, in series id order.
    """
    started = time.perf_counter()
    existing = {r["series_uid"]: r for r in conn.execute("SELECT * FROM series")}
    failed = {r["series_uid"]: r for r in conn.execute("SELECT * FROM failed_series")}
    conn.execute("DELETE FROM failed_series")
    hang_after = int(os.environ.get(HANG_ENV, "0") or 0)
    indexed: set[str] = set()
    progress.start("series", len(jobs))
    jobs = sorted(jobs, key=lambda j: j.uid)
    # A labels.csv row names a series; it applies to every volume split from it (``UID#...``).
    job_labels = [labels.get(job.uid) or labels.get(job.uid.partition("#")[0]) for job in jobs]
    reused = [reuse_outcome(job, existing.get(job.uid), failed.get(job.uid), label, settings, out)
              for job, label in zip(jobs, job_labels, strict=True)]
    loaded = pool.map(process_job, [(job, label, settings, salt, out) for job, label, outcome
                                    in zip(jobs, job_labels, reused, strict=True) if outcome is None],
                      auto_min=_AUTO_MIN_SERIES)
    for job, outcome in zip(jobs, reused, strict=True):
        if outcome is None:
            outcome = next(loaded)
        skipped += outcome.skipped
        if outcome.row is not None and job.uid in extra_meta:
            outcome.row = apply_meta(outcome.row, extra_meta[job.uid])
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
            workers = " ".join(map(str, pool.worker_pids())) or "none"
            print(f"fedmri-test-hook: hanging after {hang_after} series (worker pids: {workers})", file=sys.stderr,
                  flush=True)
            time.sleep(3600)
    gone = [(uid,) for uid in existing if uid not in indexed]
    conn.executemany("DELETE FROM series WHERE series_uid = ?", gone)
    result.seconds["series"] = time.perf_counter() - started
    return indexed


def _unique_ids(jobs: list[SeriesJob]) -> tuple[list[SeriesJob], list[Skipped]]:
    """Keep the first job of each series id; a NIfTI or BIDS name may repeat another's."""
    first: dict[str, SeriesJob] = {}
    skipped = []
    for job in jobs:
        if job.uid in first:
            skipped.append(Skipped(job.where, f"series id {job.uid} is already that of {first[job.uid].where}; "
                                              "rename one of them (labels.csv joins series by this id)"))
        else:
            first[job.uid] = job
    return list(first.values()), skipped


def _attach_segs(segs: list[SegHeader], labels: dict[str, LabelRow],
                 uids: set[str]) -> tuple[dict[str, str], list[Skipped]]:
    """Give each series the DICOM SEG found for it among the DICOM files, unless labels.csv names a mask.

    A SEG attaches to every series (or volume of one, ``UID#...``) it references.
    Updates ``labels`` in place.

    Returns:
        ``(attached, skipped)``: series id -> SEG path, and the SEGs that cannot be used.
    """
    by_base: dict[str, list[str]] = {}
    for uid in sorted(uids):
        by_base.setdefault(uid.partition("#")[0], []).append(uid)
    attached: dict[str, str] = {}
    skipped = []
    for seg in sorted(segs, key=lambda s: s.path):
        targets = [uid for ref in seg.referenced_series for uid in by_base.get(ref, [])]
        if not seg.referenced_series:
            skipped.append(Skipped(seg.path, "DICOM SEG names no referenced series (ReferencedSeriesSequence); "
                                             "give it in labels.csv's mask column for its series"))
        elif not targets:
            skipped.append(Skipped(seg.path, f"DICOM SEG of series {', '.join(seg.referenced_series)}, which is "
                                             "not among the DICOM files; export the series with its segmentation"))
        for uid in targets:
            row = labels.get(uid)
            if uid in attached:
                skipped.append(Skipped(seg.path, f"second DICOM SEG of series {uid} (the first is {attached[uid]}); "
                                                 "one mask per series is used: remove one or merge them"))
            elif row is not None and row.mask is not None:
                skipped.append(Skipped(seg.path, f"not used for series {uid}: labels.csv line {row.line} gives its "
                                                 f"mask ({row.mask}); remove one of the two"))
            else:
                attached[uid] = seg.path
                labels[uid] = merge_labels(row, LabelRow(0, uid, None, None, None, Path(seg.path)))
    return attached, skipped


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
    known = {uid for series in indexed for uid in (series, series.partition("#")[0])}
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
