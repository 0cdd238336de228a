"""Read one DICOM volume (classic per-slice files, Siemens MOSAIC or Enhanced MR multi-frame) into a Volume.

Slices are ordered by their position along the slice normal, never by file
name or InstanceNumber, and the slice step comes from those positions, not from
SliceThickness (which is the excitation thickness, and differs from the
spacing whenever there are gaps or overlaps). Each file is read once.

A series that holds several volumes (echoes, b-values, ...) is read one volume
at a time: ``load_series(paths, volume="b1000")`` keeps the images whose part
(:mod:`fedmri.data.dicom_split`) is ``b1000``. MONOCHROME1 images (bright =
low values) are inverted after rescaling, ``max + min - value``, so that every
volume reads bright = high signal.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from fedmri.data.dicom_scan import SeriesError, transfer_syntax
from fedmri.data.dicom_split import ImageKey, image_key, restrict, values, volume_parts
from fedmri.data.dicom_tags import collect_tags, frame_group
from fedmri.data.geometry import dicom_affine_ras, plane_from_normal, slice_normal
from fedmri.data.metadata import series_metadata
from fedmri.data.mosaic import is_mosaic, unpack_mosaic
from fedmri.data.vendor_tags import mosaic_images
from fedmri.data.volume import Volume
from fedmri.errors import InputError

__all__ = ["load_series"]

# Positions closer than this along the normal are the same slice (mm).
DUPLICATE_TOL_MM = 0.01
# A step this many times the median means at least one slice is missing.
GAP_FACTOR = 1.5
# Steps may wander this much (relative to the median, plus 0.01 mm) from the median.
IRREGULAR_TOL = 0.1


@dataclass
class _Frame:
    path: str
    index: int | None  # frame number inside a multi-frame file; None for a classic slice
    tile: int | None  # slice number inside a Siemens mosaic; None otherwise
    ipp: np.ndarray  # 3, LPS mm
    iop: np.ndarray  # 6
    spacing: tuple[float, float]  # PixelSpacing [rows, columns]
    pixels: np.ndarray  # rows, cols (stored values)
    slope: float
    intercept: float
    thickness: float | None
    between: float | None  # SpacingBetweenSlices
    ds: Dataset  # header (pixel bytes dropped), for metadata and error messages
    monochrome1: bool  # PhotometricInterpretation MONOCHROME1: low values are bright

    @property
    def where(self) -> str:
        if self.tile is not None:
            return f"{self.path} mosaic slice {self.tile + 1}"
        return self.path if self.index is None else f"{self.path} frame {self.index + 1}"

    def tags(self) -> dict[str, Any]:
        return collect_tags(self.ds, self.index)


def load_series(paths: Sequence[str | Path], volume: str | None = None) -> Volume:
    """Read the files of one series (or of one volume of it) into a :class:`Volume` (RAS affine, rescaled float32).

    Args:
        paths: the files of one SeriesInstanceUID, in any order.
        volume: the part of the catalog key after ``#`` (e.g. "b1000", "e2")
            when the series holds several volumes; the images of that volume
            are kept. Files that hold only one volume are read whole, whatever
            ``volume`` says (the indexer passes only that volume's files).
            None or "": all images must form one volume.

    Returns:
        The volume, ``array[i, j, k]`` with i = column, j = row and k increasing
        along the slice normal row x col; ``meta`` as in :mod:`fedmri.data.metadata`
        plus ``volume`` (the part, or None).

    Raises:
        SeriesError: unreadable file or pixels, missing geometry, mixed matrix
            size / orientation / pixel spacing, duplicate or missing slices,
            irregular spacing, a mosaic that cannot be cut, no such ``volume``.
    """
    if not paths:
        raise SeriesError("empty series: no files given")
    frames: list[_Frame] = []
    for path in paths:
        frames.extend(_frames(_read(Path(path)), str(path)))
    if volume:
        frames = _select(frames, volume)
    _check_uniform(frames)
    normal = slice_normal(frames[0].iop)
    positions = np.array([f.ipp @ normal for f in frames])  # K
    order = np.argsort(positions, kind="stable")
    frames = [frames[i] for i in order]
    positions = positions[order]
    step = _slice_step(frames, positions, normal)
    affine = dicom_affine_ras(frames[0].iop, frames[0].ipp, frames[0].spacing, step)
    rows, cols = frames[0].pixels.shape
    array = np.empty((cols, rows, len(frames)), dtype=np.float32)  # I, J, K
    for k, frame in enumerate(frames):
        array[:, :, k] = (frame.pixels.astype(np.float64) * frame.slope + frame.intercept).T
    _invert_monochrome1(array, frames)
    n_files = len({f.path for f in frames})
    meta = series_metadata(frames[0].tags(), affine, array.shape,
                           transfer_syntax_uid=str(transfer_syntax(frames[0].ds)), n_files=n_files,
                           volume=volume or None)
    return Volume(array, affine, meta)


def _select(frames: list[_Frame], volume: str) -> list[_Frame]:
    """The frames of one volume; see :func:`fedmri.data.dicom_split.volume_parts`."""
    narrowed: dict[int, Dataset] = {}
    keys: list[ImageKey] = []
    for frame in frames:
        ds = narrowed.setdefault(id(frame.ds), restrict(frame.ds))
        keys.append(image_key(ds, frame.index))
    parts = volume_parts(keys, mosaics=[f.path if f.tile is not None else None for f in frames],
                         orders=[_mosaic_order(f.ds) for f in frames])
    held = sorted(set(parts))
    if len(held) == 1:
        return frames  # the files of this one volume
    if volume not in held:
        raise SeriesError(f"no volume {volume!r} in these files, which hold {', '.join(held)}: the files changed "
                          "since they were indexed; run `fedmri data index` again")
    return [f for f, part in zip(frames, parts, strict=True) if part == volume]


def _mosaic_order(ds: Dataset) -> tuple[int, int, str]:
    """As ``dicom_scan._order``: AcquisitionNumber, InstanceNumber, SOPInstanceUID."""
    def number(key: str) -> int:
        try:
            return int(ds.get(key) or 0)
        except (TypeError, ValueError):
            return 0
    return (number("AcquisitionNumber"), number("InstanceNumber"), str(ds.get("SOPInstanceUID", "") or ""))


def _invert_monochrome1(array: np.ndarray, frames: list[_Frame]) -> None:
    """MONOCHROME1 stores bright as low: flip to ``max + min - value`` over the whole volume, in place."""
    flags = {f.monochrome1 for f in frames}
    if flags == {True}:
        lo, hi = float(array.min()), float(array.max())
        np.subtract(hi + lo, array, out=array)
    elif len(flags) > 1:
        one = next(f for f in frames if f.monochrome1)
        two = next(f for f in frames if not f.monochrome1)
        raise SeriesError(f"mixed MONOCHROME1 ({one.where}) and MONOCHROME2 ({two.where}) images: their grey "
                          "scales run in opposite directions; re-export the series with one photometric interpretation")


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on odd VRs are not the admin's problem
        try:
            ds = dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
            raise SeriesError(f"{path}: unreadable DICOM ({exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise SeriesError(f"{path}: no pixel data (truncated file, or not an image)")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # raw dataset without file meta
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax(ds)  # the pixel decoders need it
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"{path}: colour image ({ds.get('PhotometricInterpretation')}), not an MR intensity image")
    return ds


def _pixels(ds: Dataset, path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "excess padding removed": harmless
        try:
            return ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            name = transfer_syntax(ds).name
            raise SeriesError(f"{path}: cannot decode pixel data ({name}): {exc}") from exc


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where}: missing or invalid {what}: cannot place the image in space") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise SeriesError(f"{where}: invalid {what} {list(value)}: cannot place the image in space")
    return out


def _optional(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frames(ds: Dataset, path: str) -> list[_Frame]:
    """One _Frame per image plane in the file (Enhanced MR: from its functional groups)."""
    pixels = _pixels(ds, path)
    for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if key in ds:
            del ds[key]  # decoded now; do not hold both copies for the whole series
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multiframe = "PerFrameFunctionalGroupsSequence" in ds or n_frames > 1
    monochrome1 = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() == "MONOCHROME1"
    image_type = values(ds.get("ImageType"))
    mosaic = None
    if pixels.ndim == 2 and is_mosaic(image_type, n_frames):
        try:
            mosaic = unpack_mosaic(ds, pixels, mosaic_images(ds), path)
        except InputError as exc:
            raise SeriesError(str(exc)) from exc
        pixels = mosaic.pixels  # n, rows, cols
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]  # 1, rows, cols
    frames = []
    for index in range(pixels.shape[0]):
        frame = index if multiframe else None
        tile = index if mosaic is not None else None

        def get(sequence: str, keyword: str, frame: int | None = frame) -> Any:
            return ds.get(keyword) if frame is None else frame_group(ds, frame, sequence, keyword)

        where = (f"{path} mosaic slice {index + 1}" if tile is not None else
                 path if frame is None else f"{path} frame {index + 1}")
        spacing = _floats(get("PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", where)
        iop = _floats(get("PlaneOrientationSequence", "ImageOrientationPatient"), 6, "ImageOrientationPatient", where)
        row, col = iop[:3], iop[3:]
        if abs(row @ row - 1) > 1e-2 or abs(col @ col - 1) > 1e-2 or abs(row @ col) > 1e-2:
            raise SeriesError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two unit, perpendicular "
                              "directions: cannot place the image in space")
        ipp = (mosaic.positions[index] if mosaic is not None else
               _floats(get("PlanePositionSequence", "ImagePositionPatient"), 3, "ImagePositionPatient", where))
        frames.append(_Frame(
            path=path, index=frame, tile=tile,
            ipp=ipp,
            iop=iop,
            spacing=(float(spacing[0]), float(spacing[1])), pixels=pixels[index],
            slope=_optional(get("PixelValueTransformationSequence", "RescaleSlope")) or 1.0,
            intercept=_optional(get("PixelValueTransformationSequence", "RescaleIntercept")) or 0.0,
            thickness=_optional(get("PixelMeasuresSequence", "SliceThickness")),
            between=_optional(get("PixelMeasuresSequence", "SpacingBetweenSlices")),
            ds=ds, monochrome1=monochrome1,
        ))
    return frames


def _check_uniform(frames: list[_Frame]) -> None:
    sizes = Counter(f.pixels.shape for f in frames)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} images)" for (r, c), n in sizes.most_common())
        raise SeriesError(f"mixed matrix sizes {listed}: not one volume; re-export or split the series")
    iop0 = frames[0].iop
    odd = [f for f in frames if np.max(np.abs(f.iop - iop0)) > 1e-3]
    if odd:
        planes = sorted({plane_from_normal(slice_normal(f.iop)) for f in [frames[0], *odd]})
        raise SeriesError(
            f"mixed slice orientations ({frames[0].where} vs {odd[0].where}; planes: {', '.join(planes)}): "
            "a localizer/scout or a series with several stacks is not one volume"
        )
    sp0 = np.array(frames[0].spacing)
    odd = [f for f in frames if np.max(np.abs(np.array(f.spacing) - sp0)) > 1e-3 * max(1.0, sp0.max())]
    if odd:
        raise SeriesError(
            f"mixed pixel spacing {list(sp0)} ({frames[0].where}) and {list(odd[0].spacing)} ({odd[0].where}): "
            "not one volume"
        )


def _slice_step(frames: list[_Frame], positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """LPS vector from slice k to k+1, after checking the stack is complete and regular."""
    if len(frames) == 1:
        # One slice says nothing about spacing: the nominal gap (or the excitation
        # thickness) is the best available extent along the normal; 1 mm if neither.
        gap = frames[0].between or frames[0].thickness or 1.0
        return normal * abs(gap)
    steps = np.diff(positions)  # K-1
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        involved = len(set(dup.tolist()) | set((dup + 1).tolist()))
        raise SeriesError(
            f"{involved} images share slice positions, e.g. {a.where} and "
            f"{b.where} at {positions[dup[0]]:.2f} mm{_why_duplicate(a, b)}: a series with several images per "
            "position (4D) cannot be read as one volume; `fedmri data index` reads one volume per echo, b-value, "
            "direction or time point, or export one volume per series"
        )
    median = float(np.median(steps))
    ratio = steps / median  # K-1
    # a missing slice leaves a step of about 2, 3, ... times the usual one
    gaps = np.flatnonzero((ratio > GAP_FACTOR) & (np.abs(ratio - np.round(ratio)) < 0.2))
    if gaps.size:
        g = gaps[0]
        missing = int(round(steps[g] / median)) - 1
        raise SeriesError(
            f"{'slice' if missing == 1 else f'about {missing} slices'} missing between {frames[g].where} and "
            f"{frames[g + 1].where}: positions jump {steps[g]:.2f} mm where slices are {median:.2f} mm apart "
            f"({len(gaps)} gap(s) in all); re-export the complete series"
        )
    if np.max(np.abs(steps - median)) > IRREGULAR_TOL * median + 0.01:
        raise SeriesError(
            f"irregular slice spacing (steps from {steps.min():.2f} to {steps.max():.2f} mm): "
            "cannot form a regular volume"
        )
    ipps = np.stack([f.ipp for f in frames])  # K, 3
    step = (ipps[-1] - ipps[0]) / (len(frames) - 1)  # 3; keeps any consistent in-plane shift
    drift = ipps - (ipps[0] + np.arange(len(frames))[:, None] * step)  # K, 3
    if np.max(np.linalg.norm(drift, axis=1)) > 0.1 * median + 0.01:
        raise SeriesError("slice positions do not lie on one straight line: several stacks in one series?")
    return step


def _why_duplicate(a: _Frame, b: _Frame) -> str:
    tags_a, tags_b = a.tags(), b.tags()
    for key, what in (("EchoTime", "echo times (multi-echo)"), ("DiffusionBValue", "b-values (diffusion)"),
                      ("InversionTime", "inversion times"), ("TemporalPositionIdentifier", "time points"),
                      ("TriggerTime", "trigger times (dynamic/cardiac)"), ("ImageType", "image types"),
                      ("AcquisitionNumber", "acquisition numbers (repeated acquisitions)")):
        if tags_a.get(key) != tags_b.get(key):
            return f" (they differ in {what}: {tags_a.get(key)} vs {tags_b.get(key)})"
    return ""
