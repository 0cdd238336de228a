"""Find DICOM files, read their headers fast, and group them into series.

Indexing a hospital export means reading thousands of headers, so
:func:`read_header` parses only the handful of tags it returns and stops before
the pixel data. Anything that is not an MR image is reported, not raised
through: the site admin sees a list of skipped files with a reason each.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from fedmri.errors import InputError

__all__ = [
    "DicomHeader", "SeriesError", "SkipInput", "Skipped", "find_files", "group_series", "read_header", "scan_folder",
]

MR_IMAGE_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# specific_tags keeps pydicom from converting values we never look at.
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber",
    "PatientID", "Modality", "NumberOfFrames",
]
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SkipInput(InputError):
    """A file that is not a usable MR image; ``str(exc)`` is the reason."""


class SeriesError(InputError):
    """A series whose slices cannot form one volume (gaps, duplicates, mixed geometry, bad pixels)."""


@dataclass
class DicomHeader:
    """What a header-only read learns about one file (JSON-ready via ``dataclasses.asdict``)."""

    path: str
    size: int
    mtime_ns: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    accession_number: str
    patient_id: str
    modality: str
    transfer_syntax_uid: str
    number_of_frames: int


@dataclass
class Skipped:
    """One input that was not used, and why (shown to the site admin)."""

    path: str
    reason: str


def find_files(root: str | Path) -> list[Path]:
    """Every regular file under ``root``, recursively, sorted; names do not matter.

    Args:
        root: a folder (or a single file, returned as the only element).

    Raises:
        InputError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"DICOM folder {root} does not exist; give the folder that holds the exported series")
    found = []
    for folder, _dirs, names in os.walk(root):  # os.walk is several times faster than Path.rglob
        for name in names:
            path = Path(folder, name)
            if path.is_file():  # follows file symlinks, drops broken links, sockets, fifos
                found.append(path)
    return sorted(found)


def read_header(path: str | Path) -> DicomHeader:
    """Read one file's identifying tags, without its pixel data.

    Args:
        path: any file.

    Returns:
        The header of an MR image (classic or Enhanced MR).

    Raises:
        SkipInput: not DICOM, truncated or unreadable, not MR (CT, SR, ...), a
            DICOMDIR, or an MR object that holds no image (spectroscopy, screenshot).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise SkipInput(f"cannot read file: {exc.strerror}") from exc
    if stat.st_size == 0:
        raise SkipInput("empty file")
    ds = _dcmread_header(path)
    media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if media_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise SkipInput("DICOMDIR index file, not an image (the images it lists are read directly)")
    modality = str(ds.get("Modality", "") or "")
    if not modality:
        raise SkipInput("no Modality tag: truncated or incomplete header")
    if modality != "MR":
        raise SkipInput(f"modality {modality}, not MR: only MR images are used")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class and sop_class not in MR_IMAGE_CLASSES:
        raise SkipInput(f"SOP class {UID(sop_class).name} is not an MR image (spectroscopy, screenshot or report)")
    uids = {key: str(ds.get(key, "") or "").strip() for key in ("SOPInstanceUID", "SeriesInstanceUID")}
    for key, value in uids.items():
        if not _UID.match(value):
            raise SkipInput(f"missing or invalid {key} {value!r}: truncated or incomplete header")
    syntax = transfer_syntax(ds)
    return DicomHeader(
        path=str(path),
        size=int(stat.st_size),
        mtime_ns=int(stat.st_mtime_ns),
        sop_instance_uid=uids["SOPInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        modality=modality,
        transfer_syntax_uid=str(syntax or ""),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _dcmread_header(path: Path) -> Dataset:
    # pydicom's warnings (odd VRs, padding) are noise to a site admin; real
    # problems surface as missing tags or exceptions below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            pass  # no 128-byte preamble: old exports omit it, try the raw dataset
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
            raise SkipInput(f"unreadable or truncated DICOM: {exc}") from exc
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        except Exception as exc:  # noqa: BLE001
            raise SkipInput("not a DICOM file") from exc
    if "SOPInstanceUID" not in ds or "Modality" not in ds:
        raise SkipInput("not a DICOM file")
    return ds


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for files without file meta, the encoding pydicom detected.

    Old exports without the 128-byte preamble and file meta are plain
    little-endian datasets; pydicom found their VR encoding while reading.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        return UID(str(syntax))
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def group_series(headers: Iterable[DicomHeader]) -> tuple[dict[str, list[DicomHeader]], list[Skipped]]:
    """Group headers by SeriesInstanceUID, dropping repeated SOP instances.

    Args:
        headers: file headers in any order; the first file seen with a given
            SOPInstanceUID is kept (the same image exported twice).

    Returns:
        ``(series, skipped)``: headers per SeriesInstanceUID in input order, and
        the duplicates left out.
    """
    series: dict[str, list[DicomHeader]] = {}
    first_path: dict[str, str] = {}
    skipped: list[Skipped] = []
    for header in headers:
        other = first_path.get(header.sop_instance_uid)
        if other is not None:
            skipped.append(Skipped(header.path, f"duplicate of {other} (same SOPInstanceUID)"))
            continue
        first_path[header.sop_instance_uid] = header.path
        series.setdefault(header.series_instance_uid, []).append(header)
    return series, skipped


def scan_folder(root: str | Path) -> tuple[list[DicomHeader], list[Skipped]]:
    """Read the header of every file under ``root``.

    Args:
        root: folder to search recursively.

    Returns:
        ``(headers, skipped)``: MR image headers, and every other file with its reason.
    """
    headers: list[DicomHeader] = []
    skipped: list[Skipped] = []
    for path in find_files(root):
        try:
            headers.append(read_header(path))
        except SkipInput as exc:
            skipped.append(Skipped(str(path), str(exc)))
    return headers, skipped
