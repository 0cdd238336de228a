"""DICOMDIR: the index of a DICOM file-set, as CDs, DVDs and many PACS exports carry it.

A file named ``DICOMDIR`` governs the folder it lies in (PS3.10): its directory
records reference the file-set's files by relative path (ReferencedFileID).
The indexer reads the files it references and lists, with the reason, the
files in its folder that it does not reference (viewer software, autorun
files, stray copies) and the files it references that are missing. A nested
DICOMDIR governs its own folder. Names are matched case-insensitively and
without ISO 9660 version suffixes (``IM000001;1``), because a CD copied on
Linux or Windows rarely keeps the recorded case.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from pydicom import dcmread

from fedmri.data.dicom import Skipped
from fedmri.errors import InputError

__all__ = ["DICOMDIR_CLASS", "DICOMDIR_NAME", "is_dicomdir", "read_dicomdir", "select_listed"]

DICOMDIR_NAME = "DICOMDIR"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def is_dicomdir(path: str | Path) -> bool:
    """Whether ``path`` is a DICOMDIR file (reads the file meta only; never raises)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["FileSetID"])
    except Exception:  # noqa: BLE001 - anything unreadable is not a DICOMDIR
        return False
    return str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS


def read_dicomdir(path: str | Path) -> list[str]:
    """The files a DICOMDIR references, as POSIX paths relative to its folder, in record order.

    Args:
        path: the DICOMDIR file.

    Raises:
        InputError: the file is not a readable DICOMDIR.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise InputError(f"DICOMDIR cannot be read ({type(exc).__name__}: {exc})") from exc
    if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) != DICOMDIR_CLASS \
            and "DirectoryRecordSequence" not in ds:
        raise InputError("a file named DICOMDIR that is not a DICOM directory (no directory records)")
    listed = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue  # PATIENT, STUDY and SERIES records reference no file
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        listed.append(str(PurePosixPath(*(str(p).strip() for p in parts))))
    return listed


def select_listed(files: Sequence[Path], file_sets: Mapping[Path, Iterable[str]]
                  ) -> tuple[list[Path], list[Skipped], list[Skipped]]:
    """Which files to read when some folders are governed by a DICOMDIR.

    Args:
        files: every file found (DICOMDIRs included).
        file_sets: readable DICOMDIR path -> the relative paths it references
            (:func:`read_dicomdir`).

    Returns:
        ``(to_read, unlisted, missing)``: the files outside any file-set plus
        those a DICOMDIR references, in input order; the files in a DICOMDIR's
        folder that it does not reference; the files it references that are missing.
    """
    folders = {path.parent: path for path in file_sets}
    wanted = {path: {_key(p): p for p in listed} for path, listed in file_sets.items()}
    found: dict[Path, set[str]] = {path: set() for path in file_sets}
    to_read: list[Path] = []
    unlisted: list[Skipped] = []
    missing: list[Skipped] = []
    for path in files:
        if path in file_sets:
            continue  # the index itself: used, not an image
        dicomdir = next((folders[p] for p in path.parents if p in folders), None)
        if dicomdir is None:
            to_read.append(path)
            continue
        key = _key(path.relative_to(dicomdir.parent).as_posix())
        if key in wanted[dicomdir]:
            found[dicomdir].add(key)
            to_read.append(path)
        elif path.name.upper() != DICOMDIR_NAME:  # a nested DICOMDIR governs its own folder
            unlisted.append(Skipped(str(path), f"not listed in {dicomdir}: not part of the exported file-set "
                                               "(viewer software, a stray copy); if it is an image of the export, "
                                               "re-export with a complete DICOMDIR, or delete the DICOMDIR to read "
                                               "the folder file by file"))
    for dicomdir, listed in wanted.items():
        for key, relative in listed.items():
            if key not in found[dicomdir]:
                missing.append(Skipped(str(dicomdir.parent / relative),
                                       f"listed in {dicomdir} but missing: the copy of the export is incomplete; "
                                       "copy it again from the CD or PACS"))
    return to_read, unlisted, missing


def _key(relative: str) -> str:
    """Case-folded path without ISO 9660 version suffixes: how a DICOMDIR name matches a copied file."""
    return "/".join(part.split(";")[0] for part in relative.casefold().split("/"))
