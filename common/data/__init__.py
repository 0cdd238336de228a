"""Site data: DICOM/NIfTI ingestion, preprocessing, the site catalog, datasets."""

from fedmri.data.volume import Volume

__all__ = ["Volume"]
