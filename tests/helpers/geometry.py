"""Direction matrices of DICOM acquisition planes, in RAS, for the geometry tests."""

from __future__ import annotations

import math

import numpy as np

# DICOM patient coordinates (LPS) to RAS.
LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 3x3 rotation by ``degrees`` about coordinate axis ``axis``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def from_iop(row: list[float], col: list[float]) -> np.ndarray:
    """RAS direction matrix of a DICOM stack with this ImageOrientationPatient."""
    r, c = np.array(row, dtype=float), np.array(col, dtype=float)
    return LPS @ np.stack([r, c, np.cross(r, c)], axis=1)


PLANES = {
    "axial": from_iop([1, 0, 0], [0, 1, 0]),
    "sagittal": from_iop([0, 1, 0], [0, 0, -1]),
    "coronal": from_iop([1, 0, 0], [0, 0, -1]),
    "oblique": rotation(0, 20) @ rotation(1, 20) @ from_iop([1, 0, 0], [0, 1, 0]),  # 20 degrees about two axes
}
