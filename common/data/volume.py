"""The one in-memory image type that every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image with its geometry, whatever file format it came from.

    Conventions follow nibabel: ``array[i, j, k]`` is the voxel whose centre is
    at ``affine @ [i, j, k, 1]`` in RAS+ millimetres (+x towards the patient's
    right, +y anterior, +z superior). DICOM's patient frame is LPS+, so a DICOM
    affine has its first two rows negated.

    Attributes:
        array: float32 voxel values, shape (I, J, K); for DICOM, i runs along a
            row (column index), j down the columns (row index), k across slices.
        affine: 4x4 float64 voxel-index to RAS+ mm transform.
        meta: Series metadata (sequence family, vendor, spacing, ...) as plain
            JSON-serialisable values; see :mod:`fedmri.data.metadata`.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D, got shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin_ras(self) -> tuple[float, float, float]:
        """RAS+ position of voxel (0, 0, 0) in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]
