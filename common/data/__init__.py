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
    "FINDING_CODES", "IndexResult", "PreprocessSettings", "Preprocessor", "SeriesDataset", "VolumeCache",
    "index_site", "open_catalog", "read_labels", "read_reports",
]

# Preprocessing, indexing and the Dataset pull in torch and MONAI (seconds to
# import): loaded on first use so `import fedmri.data` stays light.
_LAZY = {
    "PreprocessSettings": "preprocess", "Preprocessor": "preprocess", "VolumeCache": "preprocess",
    "IndexResult": "indexer", "index_site": "indexer", "SeriesDataset": "dataset", "open_catalog": "catalog_db",
    "FINDING_CODES": "site_inputs", "read_labels": "site_inputs", "read_reports": "site_inputs",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fedmri.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedmri.data' has no attribute {name!r}")
