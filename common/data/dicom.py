"""DICOM ingestion: find files, read headers, group series, load volumes.

The one import point for DICOM reading; the work is split by job:
:mod:`fedmri.data.dicom_scan` (files, headers, grouping, errors),
:mod:`fedmri.data.dicom_series` (pixels and geometry of one series),
:mod:`fedmri.data.dicom_tags` (plain tag values, Enhanced MR functional groups),
:mod:`fedmri.data.geometry` (DICOM <-> RAS affine).
"""

from __future__ import annotations

from fedmri.data.dicom_scan import (
    DicomHeader,
    SeriesError,
    SkipInput,
    Skipped,
    find_files,
    group_series,
    read_header,
    scan_folder,
)
from fedmri.data.dicom_series import load_series

__all__ = [
    "DicomHeader", "SeriesError", "SkipInput", "Skipped", "find_files", "group_series", "load_series",
    "read_header", "scan_folder",
]
