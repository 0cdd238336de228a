"""Site data: DICOM/NIfTI ingestion, preprocessing, the site catalog, datasets."""

from fedmri.data.volume import Volume
from fedmri.data.dicom import (
    DicomHeader,
    SeriesError,
    SkipInput,
    Skipped,
    find_files,
    group_series,
    load_series,
    read_header,
    scan_folder,
)
from fedmri.data.nifti import load_nifti

__all__ = [
    "DicomHeader", "SeriesError", "SkipInput", "Skipped", "Volume", "find_files", "group_series", "load_nifti",
    "load_series", "read_header", "scan_folder",
]
