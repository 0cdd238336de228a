"""DICOM ingestion: find files, read headers, group series into volumes, load volumes.

The one import point for DICOM reading; the work is split by job:
:mod:`fedmri.data.dicom_scan` (files, headers, grouping, errors),
:mod:`fedmri.data.dicom_split` (the volumes of a series: echoes, b-values, ...; their catalog keys),
:mod:`fedmri.data.selection` (which volumes to index: ``data.index``),
:mod:`fedmri.data.dicom_series` (pixels and geometry of one volume),
:mod:`fedmri.data.mosaic` (Siemens MOSAIC slices, via nibabel),
:mod:`fedmri.data.dicom_tags` (plain tag values, Enhanced MR functional groups),
:mod:`fedmri.data.vendor_tags` (Siemens / GE / Philips private tags, CSA header),
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
from fedmri.data.dicom_split import series_key, split_key
from fedmri.data.selection import SelectionSettings

__all__ = [
    "DicomHeader", "SelectionSettings", "SeriesError", "SkipInput", "Skipped", "find_files", "group_series",
    "load_series", "read_header", "scan_folder", "series_key", "split_key",
]
