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
from fedmri.lazy import lazy_attributes

__all__ = [
    "DicomHeader", "SeriesError", "SkipInput", "Skipped", "Volume", "find_files", "group_series", "load_nifti",
    "load_series", "read_header", "scan_folder",
    "FINDING_CODES", "IndexPool", "IndexResult", "PreprocessSettings", "Preprocessor", "SeriesDataset", "VolumeCache",
    "audit_catalog", "index_site", "open_catalog", "read_labels", "read_reports",
]

# Preprocessing, indexing and the Dataset pull in torch and MONAI (seconds to
# import): loaded on first use so `import fedmri.data` stays light.
_LAZY = {
    "PreprocessSettings": "preprocess", "Preprocessor": "preprocess", "VolumeCache": "preprocess",
    "IndexResult": "indexer", "index_site": "indexer", "IndexPool": "index_pool", "audit_catalog": "audit",
    "SeriesDataset": "dataset", "open_catalog": "catalog_db",
    "FINDING_CODES": "site_inputs", "read_labels": "site_inputs", "read_reports": "site_inputs",
}


__getattr__ = lazy_attributes(__name__, {name: f"fedmri.data.{module}" for name, module in _LAZY.items()})
