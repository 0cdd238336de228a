"""One series through the indexer: decide whether it changed, read, preprocess, build its catalog row.

Kept apart from :mod:`fedmri.data.indexer` (which owns the scan, the transaction
and the joins) so each stays one job. No SQL here: the indexer writes the row.
:func:`reuse_outcome` (a few ``stat`` calls) runs in the indexer's process;
:func:`process_job` (decode, resample, write the cache entry) in its workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any

from fedmri import __version__
from fedmri.data.catalog_db import CACHE_DIR, pseudonym
from fedmri.data.dicom import DicomHeader, Skipped, load_series
from fedmri.data.masks import load_mask
from fedmri.data.nifti import load_nifti
from fedmri.data.preprocess import PreprocessSettings, Preprocessor, VolumeCache, cache_key
from fedmri.data.site_inputs import LabelRow
from fedmri.data.volume import Volume
from fedmri.errors import InputError


@dataclass
class SeriesJob:
    """The files of one series as the scan found them.

    Attributes:
        uid: SeriesInstanceUID (DICOM) or the relative path without suffix (NIfTI).
        digest: sha256 over sorted (path, size, mtime_ns); any file change changes it.
    """

    uid: str
    kind: str
    paths: list[str]
    patient: str
    study: str
    accession: str
    n_bytes: int
    digest: str

    @classmethod
    def from_dicom(cls, uid: str, headers: Sequence[DicomHeader]) -> SeriesJob:
        first = next((h for h in headers if h.patient_id), headers[0])
        return cls.from_files(uid, "dicom", [vars(h) for h in headers], first.patient_id,
                              first.study_instance_uid, first.accession_number)

    @classmethod
    def from_files(cls, uid: str, kind: str, files: Sequence[Mapping[str, Any]], patient: str, study: str,
                   accession: str) -> SeriesJob:
        entries = sorted((str(f["path"]), int(f["size"]), int(f["mtime_ns"])) for f in files)
        return cls(uid=uid, kind=kind, paths=[e[0] for e in entries], patient=patient, study=study,
                   accession=accession, n_bytes=sum(e[1] for e in entries),
                   digest=sha256(json.dumps(entries).encode()).hexdigest())

    @property
    def where(self) -> str:
        """What to show the admin for this series: its folder, or its file."""
        return os.path.commonpath(self.paths) if len(self.paths) > 1 else self.paths[0]


@dataclass
class SeriesOutcome:
    """The catalog row, or why the series itself failed, and what it cost.

    Attributes:
        row: the series' catalog row; ``None`` when it failed.
        failure: why the series could not be used (``None`` when it was).
        skipped: other inputs not used (a mask that does not fit).
    """

    row: dict[str, Any] | None
    loaded: bool = False
    preprocessed: bool = False
    failure: Skipped | None = None
    skipped: list[Skipped] = field(default_factory=list)


def reuse_outcome(job: SeriesJob, existing: Mapping[str, Any] | None, failed: Mapping[str, Any] | None,
                  label: LabelRow | None, settings: PreprocessSettings, catalog_dir: Path) -> SeriesOutcome | None:
    """The series' outcome without reading it, when nothing it depends on changed; else ``None``.

    Cheap (a few ``stat`` calls): the indexer runs it in its own process and
    hands only the series that return ``None`` to :func:`process_job`.

    Args:
        job: the series' files.
        existing: its current catalog row, if any.
        failed: its ``failed_series`` row if it failed before; unchanged, it is not read again.
        label: its labels.csv row, if any.
        settings: preprocessing settings of this run.
        catalog_dir: the catalog folder (cache paths are stored relative to it).
    """
    mask_stat = _stat_json(label.mask) if label is not None and label.mask is not None else None
    if existing is not None and _unchanged(existing, job, settings, mask_stat, label, catalog_dir):
        row = dict(existing)
        meta = json.loads(row["meta"])
        row.update(_label_columns(label, meta, mask_stat))
        return SeriesOutcome(row)
    if failed is not None and (failed["files_digest"], failed["reader"]) == (job.digest, __version__):
        return SeriesOutcome(None, failure=Skipped(failed["path"], failed["reason"]))
    return None


def process_job(job: SeriesJob, label: LabelRow | None, settings: PreprocessSettings, salt: bytes,
                catalog_dir: Path) -> SeriesOutcome:
    """Read one series, preprocess it into the cache (on a miss) and build its catalog row.

    The per-series work of an index run: pure but for the cache entry it writes
    (content addressed, written atomically), so the indexer runs it in worker
    processes (:mod:`fedmri.data.index_pool`) and writes the rows itself.

    Args:
        job: the series' files.
        label: its labels.csv row, if any.
        settings: preprocessing settings of this run.
        salt: the site's HMAC key.
        catalog_dir: the catalog folder; the cache is its ``cache/``.

    Returns:
        The new row, whether the series was preprocessed, and any inputs
        skipped (the series itself, or only its mask).
    """
    mask_stat = _stat_json(label.mask) if label is not None and label.mask is not None else None
    cache, preprocessor = _tools(settings, catalog_dir)
    outcome = SeriesOutcome(None, loaded=True)
    try:
        # A DICOM job may be one volume of a series ("UID#b1000"): the loader picks its images.
        volume = (load_series(job.paths, volume=job.uid.partition("#")[2]) if job.kind == "dicom"
                  else load_nifti(job.paths[0]))
    except InputError as exc:
        outcome.failure = Skipped(job.where, f"{exc} [series {job.uid}, {len(job.paths)} file(s)]")
        return outcome
    except Exception as exc:  # noqa: BLE001 - one odd series must not stop a site's index
        outcome.failure = Skipped(job.where, f"cannot be read ({type(exc).__name__}: {exc}) "
                                             f"[series {job.uid}]; please report this file to fedmri")
        return outcome
    mask = _load_mask(volume, label, job, outcome.skipped)
    key = cache_key(volume, settings, mask)
    if not cache.has(key):
        try:
            item = preprocessor(volume, mask)
        except Exception as exc:  # noqa: BLE001 - e.g. a degenerate affine; cache write errors still stop the run
            outcome.failure = Skipped(job.where, f"cannot be preprocessed ({type(exc).__name__}: {exc}) "
                                                 f"[series {job.uid}]; please report this series to fedmri")
            return outcome
        cache.save(key, item, settings.cache_dtype)
        outcome.preprocessed = True

    meta = {k: v for k, v in volume.meta.items() if k != "patient_id"}
    patient = job.patient or str(volume.meta.get("patient_id") or "")
    study = job.study or str(volume.meta.get("study_instance_uid") or "")
    # No PatientID: keep a study's series together, else the series is its own patient.
    patient = patient or (f"study:{study}" if study else f"series:{job.uid}")
    patient_id = pseudonym(salt, "patient", patient)
    outcome.row = {
        "id": pseudonym(salt, "series", job.uid),
        "series_uid": job.uid,
        "patient_id": patient_id,
        "study_id": pseudonym(salt, "study", study or job.uid),
        "study_uid": study,
        "accession": job.accession or str(volume.meta.get("accession_number") or ""),
        "split": "",  # set per patient by catalog_db.assign_splits once every series is in
        "sequence": meta.get("sequence_family"),
        "body_region": meta.get("body_region"),
        "vendor": meta.get("manufacturer"),
        "plane": meta.get("plane"),
        "shape": json.dumps(list(volume.shape)),
        "spacing": json.dumps([round(s, 6) for s in volume.spacing]),
        "meta": json.dumps(meta, default=str, sort_keys=True),
        "report_findings": None,
        "report_impression": None,
        **_label_columns(label, meta, mask_stat),
        "has_mask": int(mask is not None),
        "source_kind": job.kind,
        "source_paths": json.dumps(job.paths),
        "files_digest": job.digest,
        "settings": json.dumps(settings.as_dict(), sort_keys=True),
        "settings_digest": settings.digest(),
        "cache_key": key,
        "cache_path": str(cache.path(key).relative_to(catalog_dir)),
        "indexed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return outcome


@lru_cache(maxsize=4)
def _tools(settings: PreprocessSettings, catalog_dir: Path) -> tuple[VolumeCache, Preprocessor]:
    """The cache and the preprocessor of a run, built once per process."""
    return VolumeCache(catalog_dir / CACHE_DIR), Preprocessor(settings)


def _unchanged(existing: Mapping[str, Any], job: SeriesJob, settings: PreprocessSettings, mask_stat: str | None,
               label: LabelRow | None, catalog_dir: Path) -> bool:
    # A mask that failed last time is read again so its reason is listed again.
    failed_mask = label is not None and label.mask is not None and not existing["has_mask"]
    return (existing["files_digest"] == job.digest and existing["settings_digest"] == settings.digest()
            and existing["mask_stat"] == mask_stat and not failed_mask
            and (catalog_dir / existing["cache_path"]).is_file())


def _load_mask(volume: Volume, label: LabelRow | None, job: SeriesJob, skipped: list[Skipped]) -> Volume | None:
    """The label's mask (NIfTI or DICOM SEG, any grid) on the series' grid, or ``None`` with the reason listed."""
    if label is None or label.mask is None:
        return None
    try:
        return load_mask(label.mask, volume, job.uid)
    except InputError as exc:  # a bad mask costs the mask, not the series
        skipped.append(Skipped(str(label.mask), f"mask for series {job.uid} not used: {exc}"))
    except Exception as exc:  # noqa: BLE001 - nor does one the readers choke on
        skipped.append(Skipped(str(label.mask), f"mask for series {job.uid} not used: cannot be read "
                                                f"({type(exc).__name__}: {exc}); please report this file to fedmri"))
    return None


def _label_columns(label: LabelRow | None, meta: Mapping[str, Any], mask_stat: str | None) -> dict[str, Any]:
    """labels.csv values, falling back to the DICOM header for age and sex."""
    age = label.age if label is not None and label.age is not None else meta.get("patient_age")
    sex = label.sex if label is not None and label.sex is not None else meta.get("patient_sex")
    return {
        "label_findings": json.dumps(list(label.findings)) if label is not None and label.findings is not None
        else None,
        "age": float(age) if age is not None else None,
        "sex": sex,
        "mask_source": str(label.mask) if label is not None and label.mask is not None else None,
        "mask_stat": mask_stat,
    }


def _stat_json(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return json.dumps([str(path), None, None])
    return json.dumps([str(path), st.st_size, st.st_mtime_ns])
