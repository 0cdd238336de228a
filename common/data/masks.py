"""Lesion masks from where hospitals keep them, put on the series' own voxel grid.

A mask is a NIfTI file (any grid) or a DICOM Segmentation (SEG, read with
highdicom). Whatever its grid, it is resampled onto the series' grid by nearest
neighbour in RAS+ millimetres, so label values (0 = background, 1..255 = lesion
classes; a SEG's segment numbers) never mix. A mask is refused, with the reason,
when it cannot belong to the series: a SEG that references another series, a
field of view that does not overlap the series, or labelled voxels that all
fall outside it.

:func:`read_seg_header` is the scan's cheap check for SEG files found among a
site's DICOM files, so they are attached to the series they reference instead
of being skipped as "not MR".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import SegmentationStorage
from scipy import ndimage

from fedmri.data.geometry import LPS_TO_RAS
from fedmri.data.volume import Volume
from fedmri.errors import InputError

__all__ = ["SEG_CLASSES", "SegHeader", "load_mask", "read_seg_header", "resample_nearest"]

# Segmentation Storage and Label Map Segmentation Storage (DICOM 2024, not yet named by pydicom).
SEG_CLASSES = frozenset({str(SegmentationStorage), "1.2.840.10008.5.1.4.1.1.66.7"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_LABEL = 255  # masks are cached as uint8
_SEG_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "ReferencedSeriesSequence"]


@dataclass(frozen=True)
class SegHeader:
    """What the scan needs of a DICOM SEG file (JSON-ready via ``dataclasses.asdict``).

    Attributes:
        referenced_series: SeriesInstanceUIDs of ReferencedSeriesSequence: the
            series the segmentation was drawn on.
    """

    path: str
    sop_instance_uid: str
    referenced_series: tuple[str, ...]


def read_seg_header(path: str | Path) -> SegHeader | None:
    """The SEG header of ``path``, or ``None`` when the file is not a DICOM Segmentation.

    Reads only a few tags and never raises: any file that is not a readable
    SEG (not DICOM, another SOP class, truncated) gives ``None``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_SEG_TAGS)
        if str(ds.get("SOPClassUID", "")) not in SEG_CLASSES:
            return None
        refs = tuple(str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", []))
        return SegHeader(str(path), str(ds.get("SOPInstanceUID", "")), tuple(r for r in refs if r))
    except Exception:  # noqa: BLE001 - not a SEG, whatever pydicom thinks of the file
        return None


def load_mask(path: str | Path, volume: Volume, series_uid: str) -> Volume:
    """Read a NIfTI or DICOM SEG mask and put it on ``volume``'s voxel grid.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a DICOM SEG file (any name).
        volume: the series the mask belongs to (its affine is the target grid).
        series_uid: the series' id, checked against the SEG's referenced series
            (for one volume of a series, ``UID#...``, the UID before ``#``).

    Returns:
        The mask as integer labels 0..255 with ``volume``'s shape and affine.

    Raises:
        InputError: unreadable file, neither NIfTI nor SEG, a SEG of another
            series, or a mask that does not overlap the series.
    """
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        parts = [_read_nifti(path)]
    else:
        parts = _read_seg(path, series_uid)
    labels = np.zeros(volume.shape, dtype=np.uint8)  # I, J, K
    covered = np.zeros(volume.shape, dtype=bool)  # I, J, K
    n_labelled = 0
    for array, affine in parts:  # ascending label values: where they overlap, the highest wins
        codes = _codes(array)
        values, inside = resample_nearest(codes, affine, volume.shape, volume.affine)
        labels = np.where(values > 0, values, labels)
        covered |= inside
        n_labelled += int(np.count_nonzero(codes))
    if not covered.any():
        raise InputError(f"its field of view ({_extent(parts[0][1], parts[0][0].shape)}) does not overlap the "
                         f"series ({_extent(volume.affine, volume.shape)}); was it drawn on another series, or "
                         "saved in another space (a template, a resampled copy)?")
    if n_labelled and not labels.any():
        raise InputError(f"none of its {n_labelled} labelled voxels falls inside the series' field of view "
                         f"({_extent(volume.affine, volume.shape)}); was it drawn on another series?")
    return Volume(labels, volume.affine.copy())


def resample_nearest(array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     target_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour values of a label grid at the voxel centres of another grid.

    Args:
        array: labels on the source grid, shape (A, B, C); rounded and clipped to 0..255.
        affine: the source's voxel -> RAS+ mm transform.
        shape: the target grid (I, J, K).
        target_affine: the target's voxel -> RAS+ mm transform.

    Returns:
        ``(values, inside)``: uint8 labels (I, J, K), 0 outside the source, and
        whether each target voxel centre lies within the source grid.
    """
    codes = _codes(array)
    to_source = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)  # 4, 4
    if np.allclose(to_source, np.eye(4), atol=1e-4) and codes.shape == tuple(shape):
        return codes, np.ones(shape, dtype=bool)  # already on the grid
    # grid-constant: a voxel centre within half a source voxel of the source grid takes the nearest value.
    sampled = ndimage.affine_transform(codes.astype(np.int16), to_source, output_shape=tuple(shape), order=0,
                                       mode="grid-constant", cval=-1)  # I, J, K
    inside = sampled >= 0
    return np.where(inside, sampled, 0).astype(np.uint8), inside


def _codes(array: np.ndarray) -> np.ndarray:
    """Label values as the cache stores them: rounded, NaN as 0, clipped to 0..255."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, MAX_LABEL).astype(np.uint8)
    return np.clip(np.rint(np.nan_to_num(np.asarray(array, dtype=np.float32))), 0, MAX_LABEL).astype(np.uint8)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise InputError(f"not a readable NIfTI file ({exc})") from exc
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"mask has shape {list(array.shape)}; give one 3D label image")
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_seg(path: Path, series_uid: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The SEG as (labels, RAS affine) parts, in ascending segment number (one part unless FRACTIONAL)."""
    import highdicom as hd

    header = read_seg_header(path)
    if header is None:
        raise InputError("neither a NIfTI file (.nii, .nii.gz) nor a DICOM Segmentation (SEG)")
    if header.referenced_series and series_uid.partition("#")[0] not in header.referenced_series:
        raise InputError(f"the DICOM SEG was drawn on series {', '.join(header.referenced_series)}, "
                         f"not on {series_uid}; check the labels.csv row")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.segread(path)
            numbers = sorted(int(n) for n in seg.segment_numbers)
            if numbers and numbers[-1] > MAX_LABEL:
                raise InputError(f"segment numbers go up to {numbers[-1]}; fedmri masks hold labels 1..{MAX_LABEL}")
            if seg.segmentation_type != hd.seg.SegmentationTypeValues.FRACTIONAL:
                # Segment numbers become label values; where segments overlap the highest number wins.
                volumes = [(seg.get_volume(combine_segments=True, skip_overlap_checks=True), 1)]
            else:  # probabilities: a voxel belongs to a segment from 0.5 on
                volumes = [(seg.get_volume(segment_numbers=[n]), n) for n in numbers]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on odd files
        raise InputError(f"DICOM SEG cannot be read as a volume ({type(exc).__name__}: {exc})") from exc
    return [_seg_part(volume, value) for volume, value in volumes]


def _seg_part(volume: Any, value: int) -> tuple[np.ndarray, np.ndarray]:
    if str(getattr(volume.coordinate_system, "value", volume.coordinate_system)).upper() != "PATIENT":
        raise InputError("DICOM SEG is in the slide coordinate system (pathology), not the patient's")
    array = np.asarray(volume.array)
    if array.ndim == 4:  # one segment as a channel
        array = np.where(array[..., 0] >= 0.5, value, 0).astype(np.uint8)
    # highdicom's affine maps (slice, row, column) indices to LPS mm; the Volume convention is RAS.
    return array, LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)


def _extent(affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """RAS+ bounding box of a grid's voxel centres, e.g. 'x -20..8, y -7..15, z -10..5 mm'."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])  # 8, 4
    world = (np.asarray(affine) @ corners.T)[:3]  # 3, 8
    return ", ".join(f"{axis} {lo:.0f}..{hi:.0f}" for axis, lo, hi in zip("xyz", world.min(1), world.max(1),
                                                                            strict=True)) + " mm"
