"""BIDS datasets: structural images with their JSON sidecars and participants.tsv.

A small reader of the parts of the BIDS specification the catalog needs, not a
validator (pybids would add a dozen packages and a SQL index for this); the
naming and layout rules are :mod:`fedmri.data.bids_layout`:

- images are ``sub-<label>/[ses-<label>/]<datatype>/<name>.nii[.gz]`` with
  ``datatype`` ``anat`` or ``dwi``; the name is ``sub-<label>[_<key>-<label>]..._<suffix>``;
- the suffix gives the sequence family (``T1w`` -> T1, ``T2w``, ``FLAIR``, ``PDw``,
  ``T2starw``, ``dwi``; a ``ce-`` entity or a contrast agent makes T1 T1post);
- JSON sidecars follow the inheritance principle: every ``<entities>_<suffix>.json``
  from the dataset root down to the image's folder whose entities are a subset
  of the image's applies, the deeper one winning; their scanner and timing
  fields (BIDS seconds, converted to ms) fill the series metadata;
- ``participants.tsv`` gives age and sex (labels.csv, when it says, wins).

A series' id (for labels.csv) is the image name without extension, e.g.
``sub-01_ses-01_T1w``; its patient is the subject label and its study, for
reports.csv, the sidecar's StudyInstanceUID if a converter kept it, else
``sub-<label>[/ses-<label>]``. Every other file is either BIDS metadata or
listed as skipped (one entry per folder for ``derivatives/``, ``func/`` and the like).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from fedmri.data.bids_layout import classify, parse_name
from fedmri.data.dicom import Skipped, find_files
from fedmri.data.metadata import has_contrast, series_metadata
from fedmri.data.series_job import SeriesJob
from fedmri.data.site_inputs import LabelRow

__all__ = ["BidsScan", "apply_meta", "is_bids_dataset", "scan_bids"]

SUFFIX_FAMILY = {"T1w": "T1", "inplaneT1": "T1", "UNIT1": "T1", "T2w": "T2", "inplaneT2": "T2", "FLAIR": "FLAIR",
                 "PDw": "PD", "PD": "PD", "T2starw": "SWI", "T2star": "SWI", "dwi": "DWI"}
# Sidecar keys -> DICOM keywords of fedmri.data.metadata; BIDS gives times in seconds, DICOM in ms.
SIDECAR_TAGS = {"Manufacturer": "Manufacturer", "ManufacturersModelName": "ManufacturerModelName",
                "MagneticFieldStrength": "MagneticFieldStrength", "SeriesDescription": "SeriesDescription",
                "ProtocolName": "ProtocolName", "SequenceName": "SequenceName", "ImageType": "ImageType",
                "ScanningSequence": "ScanningSequence", "SequenceVariant": "SequenceVariant",
                "BodyPart": "BodyPartExamined", "BodyPartExamined": "BodyPartExamined",
                "ContrastBolusIngredient": "ContrastBolusAgent", "StudyDescription": "StudyDescription",
                "StudyInstanceUID": "StudyInstanceUID", "AccessionNumber": "AccessionNumber"}
SECONDS = ("EchoTime", "RepetitionTime", "InversionTime")
_SEXES = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}


@dataclass
class BidsScan:
    """What :func:`scan_bids` found.

    Attributes:
        jobs: one series per image (kind ``"bids"``).
        meta: series id -> ``Volume.meta`` entries from its sidecars (see :func:`apply_meta`).
        labels: age and sex from participants.tsv, per series id.
        skipped: files not used, and unusable participants.tsv rows or sidecars.
        n_files: files under the dataset root.
    """

    jobs: list[SeriesJob] = field(default_factory=list)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: list[LabelRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_files: int = 0


def is_bids_dataset(folder: str | Path) -> bool:
    """Whether ``folder`` is the root of a BIDS dataset (it holds ``dataset_description.json``)."""
    return (Path(folder) / "dataset_description.json").is_file()


def scan_bids(root: str | Path, files: Sequence[Path] | None = None) -> BidsScan:
    """Find a BIDS dataset's structural images, read their sidecars and participants.tsv.

    Args:
        root: the dataset folder (the one with ``dataset_description.json``).
        files: the files under ``root`` to consider; default all of them
            (the indexer leaves out its catalog and the masks labels.csv names).

    Returns:
        Series jobs with their metadata, and every file not used with its reason.
    """
    root = Path(root)
    files = find_files(root) if files is None else files
    scan = BidsScan(n_files=len(files))
    grouped: dict[Path, str] = {}  # folder -> reason, listed once for the whole folder
    by_folder: dict[Path, list[Path]] = {}
    images: list[tuple[Path, dict[str, str], str]] = []
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
        parts = path.relative_to(root).parts
        where, reason = classify(parts)
        if where is not None:
            grouped.setdefault(root.joinpath(*parts[:where]), reason)
        elif reason == "image":
            images.append((path, *parse_name(path.name)[:2]))  # type: ignore[misc]
        elif reason:
            scan.skipped.append(Skipped(str(path), reason))
    for folder, reason in grouped.items():
        scan.skipped.append(Skipped(f"{folder}/", reason))
    ages = _participants(root / "participants.tsv", scan.skipped)
    for path, entities, suffix in images:
        _add_image(root, path, entities, suffix, by_folder, ages, scan)
    return scan


def _participants(path: Path, skipped: list[Skipped]) -> dict[str, tuple[float | None, str | None]]:
    """participant label -> (age, sex); bad values are listed and left unknown."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        skipped.append(Skipped(str(path), f"cannot be read ({exc.strerror}); age and sex were not read"))
        return {}
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    header = [h.strip().lower() for h in next(rows, [])]
    if "participant_id" not in header:
        skipped.append(Skipped(str(path), "has no participant_id column; age and sex were not read"))
        return {}
    out: dict[str, tuple[float | None, str | None]] = {}
    for line, values in enumerate(rows, start=2):
        row = dict(zip(header, (v.strip() for v in values), strict=False))
        label = row.get("participant_id", "").removeprefix("sub-")
        age_text, sex_text = row.get("age", "n/a") or "n/a", (row.get("sex", "n/a") or "n/a").lower()
        age = _float(age_text.rstrip("+")) if age_text != "n/a" else None  # "89+": BIDS' de-identified ages
        sex = _SEXES.get(sex_text)
        problems = ([f"age {age_text!r} is not a number of years"] if age_text != "n/a" and age is None else [])
        problems += [f"sex {sex_text!r} is not M/F/O"] if sex_text != "n/a" and sex is None else []
        if problems:
            skipped.append(Skipped(f"{path}:{line}", "; ".join(problems) + " (left unknown); write n/a or fix it"))
        if label:
            out[label] = (age, sex)
    return out


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 130.0 else None


def _add_image(root: Path, path: Path, entities: dict[str, str], suffix: str, by_folder: Mapping[Path, list[Path]],
               ages: Mapping[str, tuple[float | None, str | None]], scan: BidsScan) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        scan.skipped.append(Skipped(str(path), f"cannot stat file: {exc.strerror}"))
        return
    sidecar = _sidecar(root, path, entities, suffix, by_folder, scan.skipped)
    meta = _meta(sidecar, entities, suffix)
    uid = re.sub(r"\.nii(\.gz)?$", "", path.name)
    session = f"sub-{entities['sub']}" + (f"/ses-{entities['ses']}" if "ses" in entities else "")
    job = SeriesJob.from_files(uid, "bids", [{"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}],
                               patient=entities["sub"], study=str(sidecar.get("StudyInstanceUID") or session),
                               accession=str(sidecar.get("AccessionNumber") or ""))
    # The sidecars are part of the series: editing one reads the series again.
    job.digest = sha256((job.digest + json.dumps(meta, sort_keys=True, default=str)).encode()).hexdigest()
    scan.jobs.append(job)
    scan.meta[uid] = meta
    age, sex = ages.get(entities["sub"], (None, None))
    if age is not None or sex is not None:
        scan.labels.append(LabelRow(0, uid, None, age, sex, None))


def _sidecar(root: Path, image: Path, entities: Mapping[str, str], suffix: str,
             by_folder: Mapping[Path, list[Path]], skipped: list[Skipped]) -> dict[str, Any]:
    """The image's sidecar fields after inheritance: root first, the image's own folder last."""
    merged: dict[str, Any] = {}
    folder, levels = image.parent, []
    while True:
        levels.append(folder)
        if folder == root:
            break
        folder = folder.parent
    for level in reversed(levels):
        found = []
        for candidate in by_folder.get(level, []):
            parsed = parse_name(candidate.name)
            if parsed and parsed[2] == ".json" and parsed[1] == suffix \
                    and all(entities.get(k) == v for k, v in parsed[0].items()):
                found.append((len(parsed[0]), candidate))
        for _, candidate in sorted(found):
            try:
                values = json.loads(candidate.read_text(encoding="utf-8"))
                merged.update(values if isinstance(values, dict) else {})
            except (OSError, ValueError) as exc:
                skipped.append(Skipped(str(candidate), f"sidecar is not readable JSON ({exc}); the image was "
                                                       "indexed without it: fix the file"))
    return merged


def _meta(sidecar: Mapping[str, Any], entities: Mapping[str, str], suffix: str) -> dict[str, Any]:
    """``Volume.meta`` entries that the sidecar and the name establish (geometry stays the image's)."""
    tags = {keyword: sidecar[key] for key, keyword in SIDECAR_TAGS.items() if sidecar.get(key) not in (None, "")}
    for key in SECONDS:
        if isinstance(sidecar.get(key), int | float):
            tags[key] = float(sidecar[key]) * 1000.0
    known = series_metadata(tags, np.eye(4), (1, 1, 1))
    keep = ("manufacturer", "model", "field_strength", "series_description", "study_description", "echo_time",
            "repetition_time", "inversion_time", "contrast_agent", "body_region", "study_instance_uid",
            "accession_number")
    meta = {k: known[k] for k in keep if known.get(k) not in (None, "unknown")}
    # The suffix is the curated answer; for others (maps, angio) the sidecar's description or timings.
    family = SUFFIX_FAMILY.get(suffix) or (known["sequence_family"] if tags else "other")
    meta["sequence_family"] = "T1post" if family == "T1" and ("ce" in entities or has_contrast(tags)) else family
    meta["bids_suffix"] = suffix
    return meta


def apply_meta(row: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """A catalog row with the sidecar metadata over what the NIfTI header said.

    Idempotent, so the indexer applies it to new and unchanged rows alike. Age
    and sex stay as labels.csv or participants.tsv set them.
    """
    merged = {**json.loads(row["meta"]), **meta}
    return {**row, "meta": json.dumps(merged, default=str, sort_keys=True), "sequence": merged.get("sequence_family"),
            "body_region": merged.get("body_region"), "vendor": merged.get("manufacturer")}
