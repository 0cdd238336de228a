"""DICOM slice geometry <-> nibabel-style RAS affines.

DICOM describes each slice by ImagePositionPatient (IPP: centre of the first
transmitted pixel, LPS+ mm), ImageOrientationPatient (IOP: the row direction
cosine, along which the column index i grows, then the column direction cosine,
along which the row index j grows) and PixelSpacing ``[row spacing (along j),
column spacing (along i)]``. Note the swap: PixelSpacing lists the j step first.

The reader and the writer share these functions so that they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# DICOM's patient frame is LPS+; nibabel's is RAS+: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Acquisition plane: the slice normal's largest component along a patient axis
# must be at least cos(15 deg) for the series to count as axial/coronal/sagittal.
# Routine angulations (AC-PC axials, tilted knee sagittals) stay within ~15 deg;
# anything steeper is read by radiologists as a deliberately oblique plane.
OBLIQUE_COS = math.cos(math.radians(15.0))


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal n = row x col of an ImageOrientationPatient (LPS frame).

    Args:
        iop: the six direction cosines of ImageOrientationPatient.

    Returns:
        (3,) float64 unit vector; slices are ordered by increasing IPP . n.
    """
    row, col = np.asarray(iop[:3], dtype=np.float64), np.asarray(iop[3:6], dtype=np.float64)
    n = np.cross(row, col)  # 3
    return n / np.linalg.norm(n)


def dicom_affine_ras(
    iop: Sequence[float], ipp_first: Sequence[float], pixel_spacing: Sequence[float], slice_step: np.ndarray
) -> np.ndarray:
    """RAS affine of a slice stack, array indexed (i = column, j = row, k = slice).

    Args:
        iop: ImageOrientationPatient (row cosine, column cosine), LPS.
        ipp_first: ImagePositionPatient of the first slice (k = 0), LPS mm.
        pixel_spacing: DICOM PixelSpacing ``[between rows, between columns]`` mm.
        slice_step: (3,) LPS vector from one slice's origin to the next.

    Returns:
        4x4 float64 voxel -> RAS+ mm affine.
    """
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:6], dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = row * float(pixel_spacing[1])  # i walks along a row: column spacing
    lps[:3, 1] = col * float(pixel_spacing[0])  # j walks down a column: row spacing
    lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    lps[:3, 3] = np.asarray(ipp_first, dtype=np.float64)
    return LPS_TO_RAS @ lps


def affine_to_dicom(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """Split a RAS affine into the DICOM geometry that reproduces it.

    Args:
        affine: 4x4 voxel -> RAS+ affine whose k axis points along row x col
            (see :func:`is_dicom_representable`).

    Returns:
        ``(iop, pixel_spacing, origin, step)``: the six IOP cosines, PixelSpacing
        ``[dj, di]``, and the LPS position of voxel (0, 0, 0) and the LPS step
        between slices, so that slice k has IPP ``origin + k * step``.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the flip is its own inverse
    di, dj = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = [float(v) for v in np.concatenate([lps[:3, 0] / di, lps[:3, 1] / dj])]
    return iop, [float(dj), float(di)], lps[:3, 3].copy(), lps[:3, 2].copy()


def is_dicom_representable(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether the i, j axes are orthogonal and k runs along +(row x col).

    DICOM slices are sorted along the normal row x col, so a left-handed voxel
    grid (negative determinant) or a non-orthogonal in-plane grid cannot come
    back from a DICOM reader unchanged.

    Args:
        affine: 4x4 voxel -> RAS+ affine.
        tol: tolerance on the cosines between axes.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    ci, cj, ck = (a[:, m] / np.linalg.norm(a[:, m]) for m in range(3))
    return abs(float(ci @ cj)) < tol and float(np.linalg.det(a)) > 0 and float(np.cross(ci, cj) @ ck) > 1 - tol


def plane_from_normal(normal: Sequence[float]) -> str:
    """Acquisition plane from a slice normal (LPS or RAS: only |components| matter).

    Args:
        normal: the slice normal (any length).

    Returns:
        "sagittal" (normal along left-right), "coronal" (anterior-posterior),
        "axial" (superior-inferior) or "oblique" when the largest component of
        the unit normal is below cos(15 deg) (:data:`OBLIQUE_COS`).
    """
    n = np.abs(np.asarray(normal, dtype=np.float64))
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(n))
    if n[axis] < OBLIQUE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
