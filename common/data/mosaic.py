"""Siemens MOSAIC: one classic DICOM image that tiles every slice of a volume (EPI: DWI, fMRI, perfusion).

The tiles are read left to right, top to bottom; their number, the slice
normal and the position of the first slice come from nibabel's
:class:`nibabel.nicom.dicomwrappers.MosaicWrapper` (which reads the CSA
header): the ImagePositionPatient of a mosaic describes the corner of the
whole tiled image, not of the first slice, and nibabel corrects it. Slice k
sits at ``first + k * spacing * normal``, with the spacing nibabel uses too
(SpacingBetweenSlices, else SliceThickness).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from fedmri.errors import InputError

__all__ = ["MosaicSlices", "is_mosaic", "unpack_mosaic"]


def is_mosaic(image_type: Sequence[Any], n_frames: int) -> bool:
    """A single-frame image whose ImageType says MOSAIC."""
    return n_frames <= 1 and any(str(v).strip().upper() == "MOSAIC" for v in image_type or [])


@dataclass
class MosaicSlices:
    """The slices of one mosaic image.

    Attributes:
        pixels: (n, rows, cols) stored values of each tile.
        positions: (n, 3) LPS position of each tile's first pixel.
    """

    pixels: np.ndarray
    positions: np.ndarray


def unpack_mosaic(ds: Dataset, pixels: np.ndarray, n_images: int | None, where: str) -> MosaicSlices:
    """Cut a decoded mosaic into its slices and place each in space.

    Args:
        ds: the image's dataset (CSA header and geometry tags; pixel data not needed).
        pixels: the decoded (rows, cols) mosaic.
        n_images: NumberOfImagesInMosaic (:func:`fedmri.data.vendor_tags.mosaic_images`).
        where: the file, for messages.

    Raises:
        InputError: the number of tiles is missing, the tiles do not divide the
            matrix, or the geometry tags are missing.
    """
    if not n_images:
        raise InputError(f"{where}: Siemens MOSAIC without NumberOfImagesInMosaic (private tag 0019,xx0A and "
                         "CSA header missing, e.g. removed by anonymisation): cannot cut it into slices; "
                         "export the series with the Siemens private tags kept")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns on import that its DICOM readers are experimental
        from nibabel.nicom import dicomwrappers

        try:
            wrapper = dicomwrappers.MosaicWrapper(ds, n_mosaic=n_images)
            size = wrapper.mosaic_size
            rows, cols = int(ds.Rows), int(ds.Columns)
            normal = np.asarray(wrapper.slice_normal, dtype=np.float64)
            first = wrapper.image_position
            dz = float(wrapper.voxel_sizes[2])
        except Exception as exc:  # noqa: BLE001 - nibabel raises its own and numpy errors on odd headers
            raise InputError(f"{where}: cannot read the Siemens MOSAIC geometry ({type(exc).__name__}: {exc})"
                             ) from exc
    if rows % size or cols % size or pixels.shape != (rows, cols):
        raise InputError(f"{where}: a mosaic of {n_images} slices in {size}x{size} tiles does not fit its "
                         f"{pixels.shape[0]}x{pixels.shape[1]} pixel matrix: damaged or resized export")
    if first is None or not np.all(np.isfinite(normal)) or abs(np.linalg.norm(normal) - 1) > 1e-2:
        raise InputError(f"{where}: Siemens MOSAIC without ImagePositionPatient / orientation: "
                         "cannot place its slices in space")
    rd, cd = rows // size, cols // size
    # as nibabel's MosaicWrapper.get_unscaled_data: tile k is block row k // size, block column k % size
    tiles = pixels.reshape(size, rd, size, cd).transpose(0, 2, 1, 3).reshape(size * size, rd, cd)[:n_images]
    positions = np.asarray(first, dtype=np.float64)[None] + np.arange(n_images)[:, None] * dz * normal[None]
    return MosaicSlices(tiles, positions)
