"""Find DICOM files, read their headers fast, and group them into volumes.

Indexing a hospital export means reading thousands of headers, so
:func:`read_header` parses only the handful of tags it returns and stops before
the pixel data. Anything that is not an MR image is reported, not raised
through: the site admin sees a list of skipped files with a reason each.
:func:`group_series` then splits each series into its volumes (echoes,
b-values, ...; keys in :mod:`fedmri.data.dicom_split`) and applies the site's
selection rules (:mod:`fedmri.data.selection`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from fedmri.data.dicom_split import (
    KEY_TAGS,
    ImageKey,
    image_key,
    natural,
    restrict,
    series_key,
    values,
    volume_parts,
)
from fedmri.data.mosaic import is_mosaic
from fedmri.data.selection import Candidate, SelectionSettings, select_volumes
from fedmri.data.vendor_tags import mosaic_images
from fedmri.errors import InputError

__all__ = [
    "DicomHeader", "SeriesError", "SkipInput", "Skipped", "find_files", "group_series", "read_header", "scan_folder",
]

MR_IMAGE_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# specific_tags keeps pydicom from converting values we never look at.
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber",
    "PatientID", "Modality", "NumberOfFrames", "SeriesDescription", "ProtocolName", "AcquisitionNumber",
    "InstanceNumber", *KEY_TAGS,
]
# Headers stored by an older fedmri (version 0) lack the fields that split and select volumes.
HEADER_VERSION = 1
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
    sop_class_uid: str = ""
    image_type: list[str] = field(default_factory=list)
    series_description: str = ""
    protocol_name: str = ""
    acquisition_number: int = 0
    instance_number: int = 0
    # Siemens MOSAIC: slices tiled in the one image (0: not a mosaic, or the count is missing).
    mosaic_images: int = 0
    # [[ImageKey.as_dict(), images with that key], ...]: one entry for a classic file,
    # one per distinct key for a multi-frame file (see fedmri.data.dicom_split).
    image_keys: list[list[Any]] = field(default_factory=list)
    version: int = 0

    @property
    def mosaic(self) -> bool:
        return is_mosaic(self.image_type, self.number_of_frames)


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
        raise SkipInput(f"SOP class {UID(sop_class).name} is not an MR image (secondary capture / screenshot, "
                        "spectroscopy or report)")
    uids = {key: str(ds.get(key, "") or "").strip() for key in ("SOPInstanceUID", "SeriesInstanceUID")}
    for key, value in uids.items():
        if not _UID.match(value):
            raise SkipInput(f"missing or invalid {key} {value!r}: truncated or incomplete header")
    syntax = transfer_syntax(ds)
    n_frames = _int(ds.get("NumberOfFrames"), 1) or 1
    image_type = values(ds.get("ImageType"))
    mosaic = is_mosaic(image_type, n_frames)
    n_mosaic = (mosaic_images(ds) or 0) if mosaic else 0
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
        number_of_frames=n_frames,
        sop_class_uid=sop_class,
        image_type=image_type,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        protocol_name=str(ds.get("ProtocolName", "") or ""),
        acquisition_number=_int(ds.get("AcquisitionNumber"), 0),
        instance_number=_int(ds.get("InstanceNumber"), 0),
        mosaic_images=n_mosaic,
        image_keys=_image_keys(ds, n_frames, n_mosaic),
        version=HEADER_VERSION,
    )


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _image_keys(ds: Dataset, n_frames: int, n_mosaic: int) -> list[list[Any]]:
    """Which volume(s) of its series the file's images belong to (see :mod:`fedmri.data.dicom_split`)."""
    narrowed = restrict(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values are converted here, lazily: pydicom's notes on odd ones are noise
        if "PerFrameFunctionalGroupsSequence" in ds or n_frames > 1:
            counts = Counter(image_key(narrowed, frame) for frame in range(n_frames))
            return [[key.as_dict(), n] for key, n in counts.items()]
        return [[image_key(narrowed).as_dict(), n_mosaic or 1]]


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


def group_series(headers: Iterable[DicomHeader], settings: SelectionSettings | None = None
                 ) -> tuple[dict[str, list[DicomHeader]], list[Skipped]]:
    """Group headers into volumes: by SeriesInstanceUID, then by echo, b-value, ... within a series.

    Args:
        headers: file headers in any order; the first file seen with a given
            SOPInstanceUID is kept (the same image exported twice). Headers an
            older fedmri stored (without the fields below) are read again.
        settings: the site's selection rules (``data.index``); None keeps every
            volume the files hold.

    Returns:
        ``(volumes, skipped)``: the files of each volume under its catalog key
        (the SeriesInstanceUID, or ``UID#part`` for one of several volumes of a
        series, see :mod:`fedmri.data.dicom_split`), series after series in
        input order; and the duplicates and the volumes the rules left out,
        each with its reason.
    """
    series: dict[str, list[DicomHeader]] = {}
    first_path: dict[str, str] = {}
    skipped: list[Skipped] = []
    for header in headers:
        if header.version < HEADER_VERSION:
            try:
                header = read_header(header.path)
            except SkipInput as exc:
                skipped.append(Skipped(header.path, str(exc)))
                continue
        other = first_path.get(header.sop_instance_uid)
        if other is not None:
            skipped.append(Skipped(header.path, f"duplicate of {other} (same SOPInstanceUID)"))
            continue
        first_path[header.sop_instance_uid] = header.path
        series.setdefault(header.series_instance_uid, []).append(header)
    by_path = {h.path: h for members in series.values() for h in members}
    candidates = [volume for uid, members in series.items() for volume in _volumes(uid, members)]
    kept, dropped = select_volumes(candidates, settings or SelectionSettings.keep_all())
    for volume, reason in dropped:
        skipped.append(Skipped(_where(volume.paths), f"{reason} [series {volume.key}, {len(volume.paths)} file(s)]"))
    return {volume.key: [by_path[p] for p in volume.paths] for volume in kept}, skipped


def _volumes(uid: str, members: list[DicomHeader]) -> list[Candidate]:
    """The volumes of one series, in key order."""
    items = [(h, ImageKey.from_dict(key), int(n)) for h in members for key, n in h.image_keys]
    parts = volume_parts([key for _, key, _ in items], mosaics=[h.path if h.mosaic else None for h, _, _ in items],
                         orders=[_order(h) for h, _, _ in items])
    volumes: dict[str, Candidate] = {}
    files: dict[str, set[str]] = {}  # part -> its paths, for a fast membership test
    for part, (header, key, n) in zip(parts, items, strict=True):
        volume = volumes.get(part)
        if volume is None:
            volume = volumes[part] = Candidate(
                key=series_key(uid, part), series_uid=uid, study_uid=header.study_instance_uid, paths=[],
                n_slices=0, component=key.component, description=header.series_description,
                protocol=header.protocol_name)
        if header.path not in files.setdefault(part, set()):
            files[part].add(header.path)
            volume.paths.append(header.path)
            volume.image_type += [v for v in header.image_type if v not in volume.image_type]
        unknown = header.mosaic and not header.mosaic_images  # the loader says why it cannot unpack it
        volume.n_slices = None if unknown or volume.n_slices is None else volume.n_slices + n
    return [volumes[part] for part in sorted(volumes, key=natural)]


def _order(header: DicomHeader) -> tuple[int, int, str]:
    """How mosaics with the same parameters are numbered (see ``mosaic_order`` in dicom_series)."""
    return (header.acquisition_number, header.instance_number, header.sop_instance_uid)


def _where(paths: list[str]) -> str:
    return os.path.commonpath(paths) if len(paths) > 1 else paths[0]


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
