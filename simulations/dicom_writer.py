"""Write a :class:`~fedmri.data.Volume` as a DICOM MR series.

Used by the synthetic hospitals and by the reader's tests. Geometry tags are
derived from ``volume.affine`` with the same functions the reader uses
(:mod:`fedmri.data.geometry`), pixels are stored as 16-bit integers with a
RescaleSlope/Intercept that covers the value range, and file names are opaque
random strings so that no reader can lean on them.

The slices of a classic series share all but a handful of elements, so those
are encoded once per series and each file is assembled from the shared bytes
and its own elements: byte for byte what ``pydicom.dcmwrite`` writes for the
slice's full dataset, at a fraction of the cost (deep-copying and re-encoding
~60 elements per slice took most of the writer's time).

Opt-in, for the reader's tests (the default output does not change): a
MONOCHROME1 series (``monochrome1=True``, values stored inverted so that a
reader which inverts them gets the volume back), and a multi-echo series
(:func:`write_multi_echo`: one SeriesInstanceUID, one volume per echo time).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UID,
    generate_uid,
)
from pydicom import config
from pydicom.tag import Tag
from pydicom.valuerep import DSfloat, validate_value

from fedmri.data.geometry import affine_to_dicom, is_dicom_representable
from fedmri.data.volume import Volume
from fedmri.errors import InputError

__all__ = ["SUPPORTED_TRANSFER_SYNTAXES", "write_multi_echo", "write_series"]

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# Lossless encoders available here: RLE is native to pydicom, JPEG-LS comes
# from pyjpegls, JPEG 2000 from pylibjpeg-openjpeg.
COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
SUPPORTED_TRANSFER_SYNTAXES = UNCOMPRESSED + COMPRESSED

# Written from volume.affine / the pixel array; a caller's value would contradict them.
_DERIVED = {
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation", "Rows", "Columns", "NumberOfFrames", "PixelData",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "SOPClassUID",
}
# Classic MR tags that Enhanced MR keeps inside functional groups instead.
_ENHANCED_MOVED = {"EchoTime", "RepetitionTime", "InversionTime", "DiffusionBValue", "ScanningSequence"}
# What differs between the slices of a classic series, in tag order; the rest is encoded once.
_PER_SLICE = tuple(Tag(k) for k in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
                                    "PixelData"))
# What a pixel encoder reads from the dataset.
_PIXEL_DESCRIPTION = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                      "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration")


def write_series(
    out_dir: str | Path,
    volume: Volume,
    tags: Mapping[str, Any],
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    file_names: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
    monochrome1: bool = False,
) -> list[Path]:
    """Write ``volume`` as MR Image Storage files (one per slice) or one Enhanced MR file.

    Slice k of the volume has ImagePositionPatient ``affine @ [0, 0, k, 1]``
    (in LPS), so a reader that orders slices along the normal gets the same
    array and affine back. A volume with a left-handed voxel grid (negative
    determinant) is written with its k axis reversed, which is the same image:
    DICOM readers always return k along row x col.

    Args:
        out_dir: folder to write into (created if missing).
        volume: the image; values are stored as uint16 (int16 if integer and
            negative) with RescaleSlope/Intercept, exact for integer data.
        tags: DICOM keywords to copy (PatientID, PatientAge "045Y", StudyInstanceUID,
            SeriesDescription, EchoTime, ...). UIDs not given are generated.
        transfer_syntax: one of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
        enhanced: write one multi-frame Enhanced MR file instead of one file per slice.
        file_names: names (relative to ``out_dir``) for the files, one per slice
            or one if ``enhanced``; default opaque random names.
        rng: source of generated UIDs and names; pass a seeded one for reproducible output.
        monochrome1: write PhotometricInterpretation MONOCHROME1 with the values
            stored as ``max + min - value`` (bright = low), as some scanners and
            PACS export; a reader that honours MONOCHROME1 gets ``volume`` back.

    Returns:
        Paths of the written files, in slice order.

    Raises:
        InputError: unsupported transfer syntax, unknown or geometry keyword in
            ``tags``, non-finite values, wrong number of file names, or a skewed grid.
    """
    return _write(out_dir, [volume], tags, None, transfer_syntax, enhanced, file_names, rng, monochrome1)


def write_multi_echo(
    out_dir: str | Path,
    volumes: Sequence[Volume],
    echo_times: Sequence[float],
    tags: Mapping[str, Any],
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    rng: np.random.Generator | None = None,
    monochrome1: bool = False,
) -> list[Path]:
    """Write one multi-echo series: one volume per echo time, all at the same slice positions.

    Classic files carry EchoTime and EchoNumbers (1, 2, ... in the order
    given), each echo with its own rescale; an Enhanced MR file holds every
    echo's frames, each with its own EffectiveEchoTime, under one shared rescale.

    Args:
        out_dir: folder to write into.
        volumes: one per echo, all on the same grid (shape and affine).
        echo_times: ms, one per volume, distinct and positive.
        tags: as :func:`write_series`, without EchoTime / EchoNumbers.
        transfer_syntax, enhanced, rng, monochrome1: as :func:`write_series`.

    Returns:
        Paths of the written files (classic: echo after echo, each in slice order).

    Raises:
        InputError: as :func:`write_series`, and volumes and echo times that do
            not pair up, echo times that repeat or are not positive, volumes on
            different grids, EchoTime / EchoNumbers in ``tags``.
    """
    if len(volumes) != len(echo_times) or not volumes:
        raise InputError(f"{len(volumes)} volume(s) and {len(echo_times)} echo time(s): give one echo time per volume")
    times = [float(t) for t in echo_times]
    if len(set(times)) != len(times) or min(times) <= 0:
        raise InputError(f"echo_times {times} must be distinct and positive (ms)")
    for key in ("EchoTime", "EchoNumbers"):
        if key in tags:
            raise InputError(f"tags: {key} is set per echo by write_multi_echo; do not pass it")
    first = volumes[0]
    for volume in volumes[1:]:
        if volume.shape != first.shape or not np.allclose(volume.affine, first.affine):
            raise InputError("every echo must lie on the same grid (shape and affine) as the first")
    rng = rng if rng is not None else np.random.default_rng()
    if enhanced:
        return _write(out_dir, list(volumes), tags, times, transfer_syntax, True, None, rng, monochrome1)
    uid = lambda: generate_uid(entropy_srcs=[str(int(rng.integers(0, 2**63)))])  # noqa: E731
    shared = {key: tags.get(key) or uid() for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    paths: list[Path] = []
    for number, (volume, echo) in enumerate(zip(volumes, times, strict=True), start=1):
        paths += _write(out_dir, [volume], {**tags, **shared, "EchoTime": echo, "EchoNumbers": number}, None,
                        transfer_syntax, False, None, rng, monochrome1)
    return paths


def _write(out_dir: str | Path, volumes: list[Volume], tags: Mapping[str, Any], echo_times: list[float] | None,
           transfer_syntax: str, enhanced: bool, file_names: Sequence[str] | None,
           rng: np.random.Generator | None, monochrome1: bool) -> list[Path]:
    """write_series for one volume, or (Enhanced MR, ``echo_times`` given) the echoes of one."""
    volume = volumes[0]
    rng = rng if rng is not None else np.random.default_rng()
    ts = UID(str(transfer_syntax))
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(f"{u.name} ({u})" for u in SUPPORTED_TRANSFER_SYNTAXES)
        raise InputError(f"cannot write transfer syntax {ts}: use one of {names}")
    if ts == JPEG2000Lossless and min(volume.shape[:2]) < 32:
        raise InputError(f"JPEG 2000 needs at least 32x32 pixels per slice (got {volume.shape[:2]}): "
                         "OpenJPEG's 5 wavelet levels do not fit; use RLE Lossless")
    _check_tags(tags)
    array, affine = np.asarray(volume.array), volume.affine
    if echo_times is not None:  # the echoes of one Enhanced MR file: one array, echo after echo along k
        array = np.concatenate([np.asarray(v.array) for v in volumes], axis=2)
    if not np.all(np.isfinite(array)):
        raise InputError("volume has NaN or infinite values; DICOM stores finite integers only")
    n_slices = volume.shape[2]
    if np.linalg.det(affine[:3, :3]) < 0:
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, n_slices - 1
        # each echo's slices reversed in place (one echo: simply k reversed)
        reverse = np.arange(array.shape[2]).reshape(-1, n_slices)[:, ::-1].ravel()
        array, affine = (array[:, :, ::-1] if echo_times is None else array[:, :, reverse]), affine @ flip
    if monochrome1:  # each echo over its own range, as a reader inverts each volume
        array = np.concatenate([float(a.max()) + float(a.min()) - a.astype(np.float64)
                                for a in np.split(array, array.shape[2] // n_slices, axis=2)], axis=2)
    if not is_dicom_representable(affine):
        raise InputError("volume affine has non-orthogonal voxel axes; DICOM slices cannot store a skewed grid")
    n_files = 1 if enhanced else array.shape[2]
    if file_names is None:
        file_names = [f"{int(v):016X}" for v in rng.integers(0, 2**63, size=n_files)]
    if len(file_names) != n_files:
        raise InputError(f"file_names has {len(file_names)} names; {n_files} file(s) will be written")

    stored, slope, intercept = _quantise(array)  # I, J, K integers
    iop, spacing, origin, step = affine_to_dicom(affine)
    slice_gap = float(np.linalg.norm(step))
    uid = lambda: generate_uid(entropy_srcs=[str(int(rng.integers(0, 2**63)))])  # noqa: E731

    base = _base_dataset(tags, uid, stored.dtype == np.int16)
    if monochrome1:
        base.PhotometricInterpretation = "MONOCHROME1"
    base.Rows, base.Columns = stored.shape[1], stored.shape[0]
    base.ImageOrientationPatient = _ds(iop)
    out = Path(out_dir)
    paths = [out / name for name in file_names]
    if enhanced:
        ds = _enhanced(base, tags, stored, slope, intercept, spacing, slice_gap, origin, step, uid, echo_times)
        _save(ds, paths[0], ts, np.ascontiguousarray(stored.transpose(2, 1, 0)))  # K, rows=J, cols=I
        return paths
    base.PixelSpacing = _ds(spacing)
    base.SliceThickness = base.SpacingBetweenSlices = _ds([slice_gap])[0]
    base.RescaleIntercept, base.RescaleSlope = _ds([intercept, slope])
    normal = np.cross(iop[:3], iop[3:])
    series = _SeriesEncoder(base, ts)
    for k, path in enumerate(paths):
        own = Dataset()
        own.SOPInstanceUID = uid()
        own.InstanceNumber = k + 1
        ipp = origin + k * step
        own.ImagePositionPatient = _ds(ipp.tolist())
        own.SliceLocation = _ds([float(ipp @ normal)])[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(series.encode(own, np.ascontiguousarray(stored[:, :, k].T)))  # rows=J, cols=I
    return paths


class _SeriesEncoder:
    """The files of one classic series: shared elements encoded once, each slice's own spliced in.

    Args:
        base: every element the slices share (elements with a tag in
            :data:`_PER_SLICE` are ignored: each slice brings its own).
        ts: the transfer syntax.
    """

    def __init__(self, base: Dataset, ts: UID) -> None:
        self.ts, self.sop_class = ts, base.SOPClassUID
        self.implicit = ts == ImplicitVRLittleEndian
        self.charset = base.SpecificCharacterSet
        correct_ambiguous_vr(base, True)  # as dcmwrite does, so that the parts below need no context
        bounds = (-1, *_PER_SLICE, 2**32)
        # shared[i]: encoded base elements between the (i-1)th and ith per-slice tags
        self.shared = [self._encode(Dataset({t: base[t] for t in base.keys() if lo < t < hi}))
                       for lo, hi in zip(bounds, bounds[1:], strict=False)]
        self.pixels = Dataset({Tag(k): base[k] for k in _PIXEL_DESCRIPTION if k in base})

    def encode(self, own: Dataset, pixels: np.ndarray) -> bytes:
        """The file of one slice: ``own`` holds its SOPInstanceUID, InstanceNumber, position and location."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = own.SOPInstanceUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.TransferSyntaxUID = self.ts
        if self.ts in COMPRESSED:
            _compress(self.pixels, self.ts, pixels)
            own["PixelData"] = self.pixels["PixelData"]  # OB, undefined length
        else:
            own["PixelData"] = DataElement(0x7FE00010, "OW", pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())
        parts = [self.shared[0]]
        for tag, shared in zip(_PER_SLICE, self.shared[1:], strict=True):
            parts += [self._encode(Dataset({tag: own[tag]})), shared]
        body = b"".join(parts)
        if self.ts == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5, as dcmwrite deflates
            compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
            body += b"\x00" * (len(body) % 2)
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        return head.getvalue() + body

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, self.implicit
        write_dataset(fp, ds, self.charset)
        return fp.getvalue()


def _check_tags(tags: Mapping[str, Any]) -> None:
    for key in tags:
        if key not in keyword_dict:
            raise InputError(f"tags: {key!r} is not a DICOM keyword (e.g. 'PatientID', 'SeriesDescription')")
        if key in _DERIVED:
            raise InputError(f"tags: {key} is derived from the volume (affine and pixels); do not pass it")


def _ds(values: Sequence[float]) -> list[DSfloat]:
    # auto_format keeps DS within its 16 characters at full available precision.
    return [DSfloat(float(v), auto_format=True) for v in values]


def _quantise(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Integers to store plus the (slope, intercept) that map them back."""
    lo, hi = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)) and lo >= -32768 and hi <= 32767:
        return array.astype(np.int16 if lo < 0 else np.uint16), 1.0, 0.0
    if 0 <= lo and hi <= 65535 and np.array_equal(array, np.round(array)):
        return array.astype(np.uint16), 1.0, 0.0
    # Read back the DS-formatted numbers so the quantisation uses what a reader sees.
    intercept = float(_ds([lo])[0])
    slope = float(_ds([(hi - intercept) / 65535.0 if hi > intercept else 1.0])[0])
    stored = np.clip(np.round((array.astype(np.float64) - intercept) / slope), 0, 65535)
    return stored.astype(np.uint16), slope, intercept


def _base_dataset(tags: Mapping[str, Any], uid: Any, signed: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so names with accents survive
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "PositionReferenceIndicator",
                "ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        setattr(ds, key, "" if dictionary_VR(key) not in ("DS", "IS") else None)
    ds.SeriesNumber = 1
    ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"  # research mode unless tags say otherwise
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid(), uid(), uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in tags.items():
        _set(ds, key, value)
    return ds


def _set(ds: Dataset, key: str, value: Any) -> None:
    if isinstance(value, np.generic):
        value = value.item()
    if key == "PatientAge" and isinstance(value, int | float):
        value = f"{int(value):03d}Y"
    vr = dictionary_VR(key)
    if vr == "IS" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # pydicom's validator wants IS as text; an int is what callers naturally pass
    try:
        if vr == "DS" and value is not None and not isinstance(value, str):
            # numbers are formatted to fit DS's 16 characters, so they are valid by construction
            value = _ds(value) if isinstance(value, list | tuple) else _ds([value])[0]
        else:
            # pydicom only warns on bad values when writing, and readers would then warn too
            for item in value if isinstance(value, list | tuple) else [value]:
                validate_value(vr, item, config.RAISE)
        setattr(ds, key, value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"tags: invalid value {value!r} for {key}: {exc}") from exc


def _enhanced(base: Dataset, tags: Mapping[str, Any], stored: np.ndarray, slope: float, intercept: float,
              spacing: list[float], slice_gap: float, origin: np.ndarray, step: np.ndarray, uid: Any,
              echo_times: list[float] | None = None) -> Dataset:
    """Enhanced MR: geometry and rescale live in shared / per-frame functional groups.

    With ``echo_times``, ``stored`` holds the echoes one after the other along
    k and each frame gets its own EffectiveEchoTime and echo dimension index.
    """
    ds = base
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = stored.shape[2]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    iop = list(ds.ImageOrientationPatient)
    for key in _ENHANCED_MOVED | {"ImageOrientationPatient", "EchoTrainLength", "ScanOptions"}:
        if key in ds:
            del ds[key]
    ds.PixelPresentation, ds.VolumetricProperties = "MONOCHROME", "VOLUME"
    ds.VolumeBasedCalculationTechnique, ds.ComplexImageComponent = "NONE", "MAGNITUDE"
    ds.AcquisitionContrast, ds.ContentQualification = "UNKNOWN", "PRODUCT"
    scanning = str(tags.get("ScanningSequence", ""))
    pulse = "BOTH" if "GR" in scanning and "SE" in scanning else "GRADIENT" if "GR" in scanning else "SPIN"
    ds.EchoPulseSequence = pulse
    shared = Dataset()
    shared.PixelMeasuresSequence = [_item(PixelSpacing=_ds(spacing), SliceThickness=_ds([slice_gap])[0],
                                          SpacingBetweenSlices=_ds([slice_gap])[0])]
    shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=iop)]
    shared.PixelValueTransformationSequence = [_item(RescaleIntercept=_ds([intercept])[0],
                                                     RescaleSlope=_ds([slope])[0], RescaleType="US")]
    if "RepetitionTime" in tags:
        shared.MRTimingAndRelatedParametersSequence = [_item(RepetitionTime=_ds([tags["RepetitionTime"]])[0])]
    if "EchoTime" in tags:
        shared.MREchoSequence = [_item(EffectiveEchoTime=float(tags["EchoTime"]))]
    ti = tags.get("InversionTime")
    shared.MRModifierSequence = [_item(InversionRecovery="YES" if ti else "NO",
                                       **({"InversionTimes": [float(ti)]} if ti else {}))]
    if "DiffusionBValue" in tags:
        shared.MRDiffusionSequence = [_item(DiffusionBValue=float(tags["DiffusionBValue"]),
                                            DiffusionDirectionality="ISOTROPIC")]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    n_slices = stored.shape[2] // len(echo_times) if echo_times else stored.shape[2]
    for k in range(stored.shape[2]):
        frame = Dataset()
        z, echo = k % n_slices, k // n_slices
        frame.PlanePositionSequence = [_item(ImagePositionPatient=_ds((origin + z * step).tolist()))]
        index = [z + 1] if not echo_times else [z + 1, echo + 1]
        frame.FrameContentSequence = [_item(StackID="1", InStackPositionNumber=z + 1, DimensionIndexValues=index)]
        if echo_times:
            frame.MREchoSequence = [_item(EffectiveEchoTime=float(echo_times[echo]))]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    organisation = uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organisation)]
    ds.DimensionIndexSequence = [_item(DimensionOrganizationUID=organisation, DimensionIndexPointer=0x00209057,
                                       FunctionalGroupPointer=0x00209111)]
    if echo_times:  # EffectiveEchoTime (0018,9082) in MREchoSequence (0018,9114)
        ds.DimensionIndexSequence.append(_item(DimensionOrganizationUID=organisation,
                                               DimensionIndexPointer=0x00189082, FunctionalGroupPointer=0x00189114))
    return ds


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _save(ds: Dataset, path: Path, ts: UID, pixels: np.ndarray) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts in COMPRESSED:
        _compress(ds, ts, pixels)
    else:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _compress(ds: Dataset, ts: UID, pixels: np.ndarray) -> None:
    """Set ``ds.PixelData`` to ``pixels`` encoded in ``ts`` (and the file meta's transfer syntax)."""
    try:
        ds.compress(ts, pixels, generate_instance_uid=False)
    except RuntimeError as exc:  # pydicom wraps every plugin's failure in RuntimeError
        raise InputError(
            f"{ts.name} encoder failed on a {ds.Rows}x{ds.Columns} image ({exc}); "
            "use RLE Lossless or an uncompressed transfer syntax for tiny or incompressible images"
        ) from exc
