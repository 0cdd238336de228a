"""Plain tag values out of a pydicom Dataset, classic or Enhanced MR.

:mod:`fedmri.data.metadata` works on plain mappings keyed by classic DICOM
keywords; Enhanced MR keeps the same facts in functional groups under other
names (EffectiveEchoTime, InversionTimes, EchoPulseSequence). This module
translates, so the metadata rules see one vocabulary; classic files without
DiffusionBValue get the vendor's private b-value (:mod:`fedmri.data.vendor_tags`).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName

from fedmri.data.vendor_tags import b_value

__all__ = ["collect_tags", "frame_group"]

_TOP = (
    "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber", "PatientID", "PatientAge", "PatientSex",
    "PatientBirthDate", "StudyDate", "Modality", "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength",
    "SeriesDescription", "StudyDescription", "ProtocolName", "SequenceName", "BodyPartExamined",
    "ScanningSequence", "SequenceVariant", "ImageType", "EchoTime", "RepetitionTime", "InversionTime",
    "DiffusionBValue", "ContrastBolusAgent", "TemporalPositionIdentifier", "TriggerTime", "AcquisitionNumber",
)
# Enhanced MR: (functional group sequence, keyword inside it, classic keyword)
_GROUPS = (
    ("MREchoSequence", "EffectiveEchoTime", "EchoTime"),
    ("MRTimingAndRelatedParametersSequence", "RepetitionTime", "RepetitionTime"),
    ("MRModifierSequence", "InversionTimes", "InversionTime"),
    ("MRDiffusionSequence", "DiffusionBValue", "DiffusionBValue"),
    ("FrameContentSequence", "TemporalPositionIndex", "TemporalPositionIdentifier"),
    ("MRImageFrameTypeSequence", "FrameType", "ImageType"),
)


def plain(value: Any) -> Any:
    """pydicom value -> str / int / float / list; None for sequences and bytes."""
    if isinstance(value, MultiValue | list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, DicomSequence | bytes | bytearray) or value is None:
        return None
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def frame_group(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """Value of ``keyword`` for frame ``index``: per-frame group, else shared group, else top level.

    Args:
        ds: an Enhanced MR (or other multi-frame) dataset.
        index: 0-based frame number.
        sequence: the functional group macro, e.g. "PlanePositionSequence".
        keyword: the attribute inside it, e.g. "ImagePositionPatient".
    """
    holders = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        holders.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        holders.append(shared[0])
    for holder in holders:
        items = holder.get(sequence)
        if items:
            value = items[0].get(keyword)
            if value is not None:
                return value
    return ds.get(keyword)


def collect_tags(ds: Dataset, frame: int | None = None) -> dict[str, Any]:
    """Classic-keyword mapping of the tags :mod:`fedmri.data.metadata` uses.

    Args:
        ds: the dataset (pixel data not needed).
        frame: for multi-frame files, the frame whose functional groups to read.
    """
    tags = {key: plain(ds.get(key)) for key in _TOP if key in ds}
    if frame is not None:
        for sequence, inner, key in _GROUPS:
            value = plain(frame_group(ds, frame, sequence, inner))
            if value is not None and key not in tags:
                tags[key] = value[0] if key == "InversionTime" and isinstance(value, list) and value else value
        if "ScanningSequence" not in tags and "EchoPulseSequence" in ds:
            pulse = str(ds.EchoPulseSequence).upper()
            codes = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(pulse, [])
            if str(plain(frame_group(ds, frame, "MRModifierSequence", "InversionRecovery")) or "") == "YES":
                codes.append("IR")
            tags["ScanningSequence"] = codes
        if "SequenceName" not in tags and "PulseSequenceName" in ds:
            tags["SequenceName"] = str(ds.PulseSequenceName)
        agents = ds.get("ContrastBolusAgentSequence")
        if "ContrastBolusAgent" not in tags and agents:
            tags["ContrastBolusAgent"] = str(agents[0].get("CodeMeaning", "") or "")
    if tags.get("DiffusionBValue") in (None, ""):
        b = b_value(ds)  # classic files: the vendor's private tags (Siemens, GE, Philips)
        if b is not None:
            tags["DiffusionBValue"] = b
    return tags
