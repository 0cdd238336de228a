"""Series metadata as pure functions of plain tag values.

Every function takes a mapping of DICOM keywords to plain values (str, float,
list of str), so the rules are tested with tables and reused for NIfTI, where
a file name or description stands in for SeriesDescription.

Sequence family: descriptions are tried first, in vendor styles (Siemens
``t2_tse_tra``, GE ``Ax T2 FLAIR``, Philips ``T1W_3D_TFE``); when they say
nothing, the physics decides (:func:`_family_from_physics`, TR/TE/TI in ms).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmri.data.geometry import plane_from_normal

__all__ = [
    "SEQUENCE_FAMILIES", "has_contrast", "infer_body_region", "infer_plane", "infer_sequence_family",
    "normalise_sex", "normalise_vendor", "parse_age", "series_metadata",
]

SEQUENCE_FAMILIES = ("T1", "T1post", "T2", "FLAIR", "PD", "DWI", "ADC", "SWI", "other")

_B = r"(?<![a-z])"  # left word boundary that treats "_" and digits as separators
_T1 = re.compile(_B + r"t1(?![0-9])|mp2?-?rage|spgr|bravo|tfl3d|" + _B + r"(vibe|lava|tfe|thrive|t1w)")
_T2 = re.compile(_B + r"t2(?![0-9*]|\s*star)|haste|ssfse|frfse|fiesta|" + _B + r"(ciss|stir|tirm|t2w)(?![a-z])")
_FAMILY_TEXT = [  # tried in order; the first match wins
    ("ADC", re.compile(_B + r"[de]?adc(?![a-z])|apparent\s*diffusion")),
    ("DWI", re.compile(_B + r"(dwi|dti|diff|diffusion|trace|tracew|isodwi)(?![a-z])|ep_b\d|ep2d_diff|"
                       + _B + r"b\s*=?\s*\d{3,4}(?![0-9])|" + r"(?<![0-9a-z])\d{3,4}\s*b(?![a-z])")),
    ("SWI", re.compile(r"swi|swan|venobold|susceptib|" + _B + r"t2\s*\*|t2\s*star|" + _B
                       + r"(hemo|minip|mnip|medic|merge)(?![a-z])")),
    ("FLAIR", re.compile(r"flair|dark[\s_-]?fluid")),
    ("PD", re.compile(_B + r"(pd|pdw|pdfs|proton[\s_-]?density)(?![a-z])")),
]
_GRE = re.compile(_B + r"(gre|ffe|fl2d|flash|gradient)")
_PRE = re.compile(_B + r"(pre|non|without|w/o|no)[\s_-]*(contrast|gad|gd|c)(?![a-z])")
_POST = re.compile(r"\+\s*(c|gd|gad|km)(?![a-z])|" + _B + r"c\+|t1c(?![a-z])|t1ce|t1gd|"
                   + _B + r"(post|gad|gado|gd|contrast|ce|km|kontrast)(?![a-z])")
_NO_AGENT = {"", "none", "no", "n", "nil", "0", "-", "null"}

_REGIONS = {  # BodyPartExamined (upper case, separators removed) -> region
    "brain": {"BRAIN", "HEAD", "SKULL", "CEREBRUM", "NEURO"},
    "spine": {"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "WHOLESPINE",
              "LUMBAR", "CERVICAL", "SACRUM", "COCCYX"},
    "abdomen": {"ABDOMEN", "LIVER", "PANCREAS", "KIDNEY", "ABDOMENPELVIS"},
    "chest": {"CHEST", "THORAX", "LUNG"},
    "heart": {"HEART", "CARDIAC"},
}
_REGION_TEXT = [  # (region, pattern) on descriptions, series first, then study
    ("spine", re.compile(r"spine|spinal|[clt][\s-]?spine|lumbar|cervical|" + _B + r"(lws|hws|bws|myelon|sacrum)")),
    ("brain", re.compile(r"brain|" + _B + r"(head|neuro|cerebr|cranial|skull|iac|orbits?|pituitary|sella|kopf|"
                         r"sch[aä]del|stroke)|mprage")),
    ("knee", re.compile(r"knee|knie|menisc")),
    ("shoulder", re.compile(r"shoulder|schulter")),
    ("hip", re.compile(_B + r"hips?(?![a-z])")),
    ("ankle", re.compile(r"ankle")),
    ("wrist", re.compile(r"wrist")),
    ("elbow", re.compile(r"elbow")),
    ("breast", re.compile(r"breast|mamma")),
    ("prostate", re.compile(r"prostat")),
    ("heart", re.compile(r"cardiac|heart")),
    ("abdomen", re.compile(r"abdom|liver|pancrea|renal|kidney|mrcp")),
    ("pelvis", re.compile(r"pelvi|uterus")),
    ("chest", re.compile(r"chest|thorax")),
]
_VENDORS = [("siemens", "Siemens"), ("philips", "Philips"), ("toshiba", "Canon"), ("canon", "Canon"),
            ("hitachi", "Hitachi"), ("fujifilm", "Hitachi"), ("general electric", "GE")]


def _text(tags: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        value = tags.get(key)
        parts.extend(value if isinstance(value, list | tuple) else [value] if value else [])
    return " ".join(str(p) for p in parts).lower()


def _float(value: Any) -> float | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _codes(value: Any) -> set[str]:
    """Multi-valued code strings: ["SE", "IR"] or "SE\\IR" -> {"SE", "IR"}."""
    items = value if isinstance(value, list | tuple) else str(value or "").split("\\")
    return {str(item).strip().upper() for item in items if str(item).strip()}


def has_contrast(tags: Mapping[str, Any]) -> bool:
    """Whether the series was acquired after contrast (agent tag, else description)."""
    agent = str(tags.get("ContrastBolusAgent") or "").strip().lower()
    if agent not in _NO_AGENT:
        return True
    text = _text(tags, ("SeriesDescription", "ProtocolName"))
    return not _PRE.search(text) and bool(_POST.search(text))


def infer_sequence_family(tags: Mapping[str, Any]) -> str:
    """Sequence family, one of :data:`SEQUENCE_FAMILIES`.

    Args:
        tags: DICOM keywords -> plain values; used: SeriesDescription, ProtocolName,
            SequenceName, ImageType, ScanningSequence, SequenceVariant, EchoTime,
            RepetitionTime, InversionTime (ms), DiffusionBValue, ContrastBolusAgent.

    Returns:
        The family; T1 becomes "T1post" after contrast; "other" when nothing fits.
    """
    family = _family_from_text(_text(tags, ("SeriesDescription", "ProtocolName", "SequenceName", "ImageType")))
    family = family or _family_from_physics(tags) or "other"
    return "T1post" if family == "T1" and has_contrast(tags) else family


def _family_from_text(text: str) -> str | None:
    if not text:
        return None
    for family, pattern in _FAMILY_TEXT:
        if pattern.search(text):
            if family == "FLAIR" and _T1.search(text):
                return "T1"  # GE's "T1 FLAIR" is an inversion-prepared T1-weighted series
            return family
    t1, t2 = bool(_T1.search(text)), bool(_T2.search(text))
    if t2 and _GRE.search(text) and not t1:
        return "SWI"  # "T2* GRE" written as "t2_gre" / "T2_FFE": gradient-echo T2* weighting
    if t1 != t2:
        return "T1" if t1 else "T2"
    return None  # neither, or "T1/T2": let the physics decide


def _family_from_physics(tags: Mapping[str, Any]) -> str | None:
    """Rules on ms timings for series with no telling description.

    Thresholds are the textbook ranges at 1.5-3 T: FLAIR TI 1800-2800, STIR
    TI 120-250, MPRAGE / T1-FLAIR TI 700-1200; SE T1 TR < 1000 TE < 30, T2
    TR > 1500 TE > 60, PD TR > 1500 TE < 40; GRE T2* / SWI TE >= 15.
    """
    b_value = _float(tags.get("DiffusionBValue"))
    if b_value is not None and b_value > 0:
        return "DWI"
    scan, variant = _codes(tags.get("ScanningSequence")), _codes(tags.get("SequenceVariant"))
    tr, te, ti = (_float(tags.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    if ti is not None and ti > 0:
        if ti >= 1500:
            return "FLAIR"
        # STIR nulls fat and keeps fluid bright: read clinically as a T2-weighted series.
        return "T2" if ti <= 300 else "T1"
    if "GR" in scan:
        if te is not None and te >= 15:
            return "SWI"
        if "MP" in variant or (te is not None and te < 10):
            return "T1"
        return None
    if "EP" in scan or tr is None or te is None:
        return None  # echo-planar without a b-value (fMRI, perfusion) or nothing to go on
    if tr < 1000 and te < 30:
        return "T1"
    if tr >= 1500:
        return "T2" if te >= 60 else "PD" if te < 40 else None
    return None


def infer_body_region(tags: Mapping[str, Any]) -> str:
    """Body region, lower case ("brain", "spine", "knee", ...; "unknown" if nothing says).

    BodyPartExamined wins when set; unmapped values come back lower-cased.
    Otherwise SeriesDescription/ProtocolName, then StudyDescription, are searched.
    """
    part = re.sub(r"[^A-Z]", "", str(tags.get("BodyPartExamined") or "").upper())
    if part:
        for region, names in _REGIONS.items():
            if part in names:
                return region
        return part.lower()
    for keys in (("SeriesDescription", "ProtocolName"), ("StudyDescription",)):
        text = _text(tags, keys)
        for region, pattern in _REGION_TEXT:
            if pattern.search(text):
                return region
    return "unknown"


def normalise_vendor(manufacturer: str | None) -> str | None:
    """"GE MEDICAL SYSTEMS" -> "GE", "SIEMENS Healthineers" -> "Siemens", TOSHIBA -> "Canon", ..."""
    raw = str(manufacturer or "").strip()
    low = raw.lower()
    if not raw:
        return None
    if re.match(r"ge(\s|_|$)", low):
        return "GE"
    return next((name for key, name in _VENDORS if key in low), raw)


def parse_age(age: Any, birth_date: str | None = None, study_date: str | None = None) -> float | None:
    """Age in years from PatientAge ("045Y", "006M", "003W", "010D"), else from the dates."""
    text = str(age or "").strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text)
    if match:
        per_year = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}[match.group(2)]
        return float(match.group(1)) / per_year
    born, seen = _date(birth_date), _date(study_date)
    return (seen - born).days / 365.25 if born and seen else None


def normalise_sex(sex: Any) -> str | None:
    """"M"/"F"/"O", else None."""
    value = str(sex or "").strip().upper()[:1]
    return value if value in ("M", "F", "O") else None


def infer_plane(affine: np.ndarray) -> str:
    """Acquisition plane of a voxel grid: the normal of its (i, j) plane.

    See :func:`fedmri.data.geometry.plane_from_normal` (oblique beyond 15 degrees).
    """
    a = np.asarray(affine, dtype=np.float64)
    return plane_from_normal(np.cross(a[:3, 0], a[:3, 1]))


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def series_metadata(tags: Mapping[str, Any], affine: np.ndarray, shape: Sequence[int], **extra: Any) -> dict[str, Any]:
    """The ``Volume.meta`` dict (plain JSON types; unknown -> None).

    Args:
        tags: DICOM keywords -> plain values for the series.
        affine: the volume's RAS affine (voxel size and plane come from it).
        shape: the volume's (I, J, K).
        **extra: further keys (``transfer_syntax_uid``, ``n_files``) added as given.
    """
    field = _float(tags.get("MagneticFieldStrength"))
    if field is not None and field > 20:
        field = field / 10000.0  # some old scanners write gauss
    date = _date(tags.get("StudyDate"))
    agent = str(tags.get("ContrastBolusAgent") or "").strip()
    text = lambda key: (str(tags[key]).strip() or None) if tags.get(key) is not None else None  # noqa: E731
    meta = {
        "series_instance_uid": text("SeriesInstanceUID"), "study_instance_uid": text("StudyInstanceUID"),
        "accession_number": text("AccessionNumber"), "patient_id": text("PatientID"),
        "patient_age": parse_age(tags.get("PatientAge"), tags.get("PatientBirthDate"), tags.get("StudyDate")),
        "patient_sex": normalise_sex(tags.get("PatientSex")),
        "study_date": date.isoformat() if date else text("StudyDate"),
        "modality": text("Modality"), "manufacturer": normalise_vendor(tags.get("Manufacturer")),
        "model": text("ManufacturerModelName"), "field_strength": field,
        "series_description": text("SeriesDescription"), "study_description": text("StudyDescription"),
        "sequence_family": infer_sequence_family(tags), "body_region": infer_body_region(tags),
        "plane": infer_plane(affine),
        "voxel_size": [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)],
        "shape": [int(s) for s in shape],
        "echo_time": _float(tags.get("EchoTime")), "repetition_time": _float(tags.get("RepetitionTime")),
        "inversion_time": _float(tags.get("InversionTime")), "b_value": _float(tags.get("DiffusionBValue")),
        "contrast_agent": agent if agent.lower() not in _NO_AGENT else None,
    }
    meta.update(extra)
    return meta
