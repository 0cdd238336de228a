"""Read a site's ``reports.csv`` and ``labels.csv`` without letting one bad row stop the index.

Hospital exports are messy: a report typed in another code page, a stray
column, an age of "45y". A file that cannot be used at all (missing, no header,
a required column absent) is the admin's to fix and raises
:class:`~fedmri.errors.InputError`; a bad row is returned as a
:class:`~fedmri.data.dicom.Skipped` entry naming ``FILE:LINE`` and what to do,
and the other rows are used.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fedmri.data.dicom import Skipped
from fedmri.errors import InputError

# The fixed finding vocabulary of labels.csv; the Dataset's multi-hot follows this order.
FINDING_CODES: tuple[str, ...] = ("mass", "wmh", "infarct", "effusion", "disc_herniation")
REPORT_COLUMNS = ("accession_number", "study_instance_uid", "findings", "impression")
LABEL_COLUMNS = ("series_instance_uid", "findings", "age", "sex", "mask")
SEXES = ("M", "F", "O")
MAX_AGE = 130.0


@dataclass(frozen=True)
class ReportRow:
    """One study's report. ``line`` is where the row starts in the file (1-based)."""

    line: int
    accession_number: str
    study_instance_uid: str
    findings: str
    impression: str


@dataclass(frozen=True)
class LabelRow:
    """One series' labels; ``None`` where the source leaves a value empty.

    Attributes:
        line: the labels.csv line; 0 for labels the data itself gives (a DICOM
            SEG in the DICOM folder, a BIDS participants.tsv).
        findings: codes from :data:`FINDING_CODES`, empty for "no finding";
            ``None`` when the source says nothing about findings.
        mask: absolute path of the mask, checked to exist: a NIfTI file on any
            grid or a DICOM SEG (see :mod:`fedmri.data.masks`).
    """

    line: int
    series_instance_uid: str
    findings: tuple[str, ...] | None
    age: float | None
    sex: str | None
    mask: Path | None


def merge_labels(first: LabelRow | None, second: LabelRow) -> LabelRow:
    """``first``'s values where it has them, ``second``'s elsewhere.

    The indexer passes the labels.csv row first, so what the site admin wrote
    wins over what the data says (participants.tsv, a SEG found beside the images).
    """
    if first is None:
        return second
    return replace(first, **{name: getattr(second, name) for name in ("findings", "age", "sex", "mask")
                             if getattr(first, name) is None})


def _rows(path: Path, required: tuple[str, ...], what: str) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Yield ``(line, row)`` for each record, or ``(line, reason)`` for a record that cannot be used."""
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist; give the path of the CSV file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    # surrogateescape keeps undecodable bytes as lone surrogates, so a bad row
    # can be found and skipped while every other row is still read.
    reader = csv.reader(io.StringIO(raw.decode("utf-8", errors="surrogateescape"), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{what} file {path} is empty; it needs a header row: {','.join(required)}") from None
    except csv.Error as exc:
        raise InputError(f"{what} file {path} is not a readable CSV file: {exc}") from None
    names = [name.strip().lower() for name in header]
    missing = [col for col in required if col not in names]
    if missing or _undecodable(",".join(header)):
        raise InputError(f"{what} file {path} lacks column(s) {', '.join(missing) or '(header not UTF-8)'}; "
                         f"its header row must be: {','.join(required)}")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            yield start, f"malformed CSV ({exc}); fix the quoting of this row"
            continue
        end = reader.line_num
        if not any(field.strip() for field in record):
            continue  # blank line
        if any(_undecodable(field) for field in record):
            yield start, ("text is not valid UTF-8; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                          "and index again")
        elif len(record) != len(names):
            yield start, f"has {len(record)} fields, the header has {len(names)}; fix the row's commas or quoting"
        else:
            yield start, {name: field.strip() for name, field in zip(names, record, strict=True)}


def _undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_reports(path: str | Path) -> tuple[list[ReportRow], list[Skipped]]:
    """Read ``reports.csv`` (columns ``accession_number,study_instance_uid,findings,impression``).

    Args:
        path: the CSV file, UTF-8 (a BOM is accepted).

    Returns:
        ``(rows, skipped)``: usable reports in file order, and each unusable row
        as ``Skipped("FILE:LINE", reason)``.

    Raises:
        InputError: the file is missing, empty, or lacks a required column.
    """
    path = Path(path)
    rows: list[ReportRow] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, REPORT_COLUMNS, "reports"):
        where = f"{path}:{line}"
        if isinstance(row, str):
            skipped.append(Skipped(where, f"report row {row}"))
            continue
        accession, study = row["accession_number"], row["study_instance_uid"]
        key = f"accession {accession}" if accession else f"study {study}"
        if not accession and not study:
            skipped.append(Skipped(where, "report row has neither accession_number nor study_instance_uid; "
                                          "fill one so it can be joined to its series"))
        elif not row["findings"] and not row["impression"]:
            skipped.append(Skipped(where, f"report row for {key} has no findings or impression text"))
        elif key in seen:
            skipped.append(Skipped(where, f"second report for {key} (first at line {seen[key]}); "
                                          "keep one row per study"))
        else:
            seen[key] = line
            rows.append(ReportRow(line, accession, study, row["findings"], row["impression"]))
    return rows, skipped


def read_labels(path: str | Path) -> tuple[list[LabelRow], list[Skipped]]:
    """Read ``labels.csv`` (columns ``series_instance_uid,findings,age,sex,mask``).

    ``findings`` is a ``;``-separated list of :data:`FINDING_CODES` (empty = no
    finding); ``age`` in years; ``sex`` M/F/O; ``mask`` a path relative to the
    CSV's folder: a NIfTI mask (on the series' grid or any other: it is resampled)
    or a DICOM SEG file. A row with any bad value is skipped whole, with every
    problem named, so no series is trained on half-checked labels.

    Args:
        path: the CSV file, UTF-8.

    Returns:
        ``(rows, skipped)`` as for :func:`read_reports`.

    Raises:
        InputError: the file is missing, empty, or lacks a required column.
    """
    path = Path(path)
    rows: list[LabelRow] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, LABEL_COLUMNS, "labels"):
        where = f"{path}:{line}"
        if isinstance(row, str):
            skipped.append(Skipped(where, f"label row {row}"))
            continue
        problems: list[str] = []
        uid = row["series_instance_uid"]
        if not uid:
            problems.append("empty series_instance_uid")
        elif uid in seen:
            problems.append(f"second label row for series {uid} (first at line {seen[uid]})")
        codes = tuple(c.strip().lower() for c in row["findings"].split(";") if c.strip())
        unknown = [c for c in codes if c not in FINDING_CODES]
        if unknown:
            problems.append(f"unknown finding code(s) {', '.join(unknown)} (known: {', '.join(FINDING_CODES)})")
        age = _age(row["age"], problems)
        sex = row["sex"].upper() or None
        if sex is not None and sex not in SEXES:
            problems.append(f"sex {row['sex']!r} is not one of {'/'.join(SEXES)}")
        mask = (path.parent / row["mask"]).resolve() if row["mask"] else None
        if mask is not None and not mask.is_file():
            problems.append(f"mask file {row['mask']} not found next to {path.name}")
        if problems:
            skipped.append(Skipped(where, "label row skipped: " + "; ".join(problems)))
            continue
        seen[uid] = line
        rows.append(LabelRow(line, uid, tuple(dict.fromkeys(codes)), age, sex, mask))
    return rows, skipped


def _age(text: str, problems: list[str]) -> float | None:
    if not text:
        return None
    try:
        age = float(text)
    except ValueError:
        problems.append(f"age {text!r} is not a number of years")
        return None
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE:
        problems.append(f"age {text!r} is outside 0-{MAX_AGE:g} years")
        return None
    return age
