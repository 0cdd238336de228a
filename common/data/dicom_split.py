"""Which volume of its series each image belongs to, and the catalog key of that volume.

One SeriesInstanceUID may hold several volumes at the same slice positions:
the echoes of a multi-echo sequence, the b-values and gradient directions of
a diffusion series, the time points of a dynamic series, magnitude and phase
images, or several Siemens mosaics. ``fedmri data index`` makes each its own
catalog entry, keyed

    ``<SeriesInstanceUID>#<part>[-<part>...]``

with one part, in this order, for each property that varies within the series:

- ``e<n>``: echo n, distinct echo times counted from the shortest (``e1``, ``e2``);
- ``b<b>``: the b-value in s/mm^2, rounded (``b0``, ``b1000``);
- ``d<n>``: gradient direction n of that b-value, directions sorted by their
  components; only for b-values acquired along several directions;
- ``t<n>``: TemporalPositionIdentifier (Enhanced MR: TemporalPositionIndex) n;
- ``mag``, ``phase``, ``real``, ``imag``, ``fieldmap``: the complex component;
- ``r<n>``: the n-th of several Siemens mosaics that agree on all of the above
  (repeats, fMRI time points), in AcquisitionNumber then InstanceNumber order.

So a b=0 and a b=1000 mosaic of one series become ``UID#b0`` and ``UID#b1000``,
and the second echo of a dual-echo series ``UID#e2``. A series that holds one
volume keeps its plain SeriesInstanceUID as its key. UIDs are digits and dots,
so ``#`` cannot be part of one. Parts come from the images' own tags, never
from file names or reading order, so the same files always get the same keys,
and :func:`fedmri.data.dicom.load_series` finds a volume's frames inside a
multi-frame file again from its part.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from fedmri.data.dicom_tags import frame_group, plain
from fedmri.data.vendor_tags import PRIVATE_TAGS, b_value, ge_complex_component, gradient_direction

__all__ = ["KEY_TAGS", "ImageKey", "image_key", "restrict", "series_key", "split_key", "values", "volume_parts"]

# Tags image_key reads; a header-only read keeps exactly these (plus its own).
KEY_TAGS = sorted({Tag(k) for k in (
    "ImageType", "EchoTime", "DiffusionBValue", "DiffusionGradientOrientation", "TemporalPositionIdentifier",
    "ComplexImageComponent", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
)} | set(PRIVATE_TAGS))
_KEY_TAG_SET = frozenset(KEY_TAGS)
_COMPONENT_WORDS = {"M": "M", "MAGNITUDE": "M", "P": "P", "PHASE": "P", "R": "R", "REAL": "R", "I": "I",
                    "IMAGINARY": "I", "FIELD_MAP": "FM", "FIELDMAP": "FM", "B0 MAP": "FM", "B0MAP": "FM"}
_COMPONENT_NAMES = {"M": "mag", "P": "phase", "R": "real", "I": "imag", "FM": "fieldmap"}
_SEPARATOR = "#"


@dataclass(frozen=True)
class ImageKey:
    """What tells one volume of a series from another (None: the image does not say).

    Attributes:
        echo_time: ms, rounded to 0.001.
        b_value: s/mm^2, rounded to 1.
        direction: gradient direction, rounded to 0.001; None for b=0 and traces.
        temporal: TemporalPositionIdentifier / TemporalPositionIndex.
        component: "M", "P", "R", "I" or "FM" (field map).
    """

    echo_time: float | None = None
    b_value: float | None = None
    direction: tuple[float, float, float] | None = None
    temporal: int | None = None
    component: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the direction becomes a list)."""
        out = asdict(self)
        out["direction"] = list(self.direction) if self.direction is not None else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageKey:
        direction = values.get("direction")
        return cls(**{**values, "direction": tuple(direction) if direction is not None else None})


def restrict(ds: Dataset) -> Dataset:
    """The elements of ``ds`` that :func:`image_key` reads: what a header-only read of the file holds.

    Keys computed from a full read and from a header-only read must agree, so
    a full read is narrowed to the same tags first.
    """
    out = Dataset()
    for tag in ds.keys():
        if tag in _KEY_TAG_SET:
            out[tag] = ds[tag]
    return out


def _number(value: Any, digits: int) -> float | None:
    value = plain(value)
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return round(float(value), digits) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def values(value: Any) -> list[str]:
    """A multi-valued string tag as a list: pydicom gives a single value (VM 1) as a plain string."""
    value = plain(value)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def component_from_image_type(image_type: Sequence[str]) -> str | None:
    """Complex component named in ImageType / FrameType values (Siemens "P", Philips "M_FFE", ...)."""
    for value in image_type:
        word = str(value).strip().upper()
        if word in _COMPONENT_WORDS:
            return _COMPONENT_WORDS[word]
        head = word.split("_", 1)[0]
        if "_" in word and head in ("M", "P", "R", "I"):  # Philips: M_SE, P_FFE, R_IR
            return head
    return None


def image_key(ds: Dataset, frame: int | None = None) -> ImageKey:
    """The :class:`ImageKey` of a classic image (``frame`` None) or of one frame of a multi-frame image.

    Args:
        ds: the dataset, narrowed by :func:`restrict` (or read with :data:`KEY_TAGS`).
        frame: 0-based frame of an Enhanced MR file.
    """
    if frame is None:
        echo = _number(ds.get("EchoTime"), 3)
        b = _number(ds.get("DiffusionBValue"), 0) if "DiffusionBValue" in ds else None
        b = b if b is not None else _number(b_value(ds), 0)
        temporal = _number(ds.get("TemporalPositionIdentifier"), 0)
        image_type = values(ds.get("ImageType"))
        component = (_COMPONENT_WORDS.get(str(ds.get("ComplexImageComponent", "")).upper())
                     or component_from_image_type(image_type) or ge_complex_component(ds))
        direction = gradient_direction(ds)
    else:
        echo = _number(frame_group(ds, frame, "MREchoSequence", "EffectiveEchoTime"), 3)
        b = _number(frame_group(ds, frame, "MRDiffusionSequence", "DiffusionBValue"), 0)
        temporal = _number(frame_group(ds, frame, "FrameContentSequence", "TemporalPositionIndex"), 0)
        complex_ = str(frame_group(ds, frame, "MRImageFrameTypeSequence", "ComplexImageComponent") or "").upper()
        frame_type = values(frame_group(ds, frame, "MRImageFrameTypeSequence", "FrameType"))
        component = _COMPONENT_WORDS.get(complex_) or component_from_image_type(frame_type)
        direction = None
        diffusion = frame_group(ds, frame, "MRDiffusionSequence", "DiffusionGradientDirectionSequence")
        vector = plain(diffusion[0].get("DiffusionGradientOrientation")) if diffusion else None
        numbers = [_number(v, 6) for v in vector] if isinstance(vector, list) and len(vector) == 3 else []
        if numbers and None not in numbers and max(abs(v) for v in numbers) > 1e-6:  # type: ignore[arg-type]
            direction = (numbers[0], numbers[1], numbers[2])
    if direction is not None:
        direction = tuple(round(v, 3) + 0.0 for v in direction)  # + 0.0: no -0.0
    return ImageKey(echo_time=echo, b_value=b, direction=direction,  # type: ignore[arg-type]
                    temporal=int(temporal) if temporal is not None else None, component=component)


def _rank(values: set[Any]) -> dict[Any, int]:
    ordered = sorted(values, key=lambda v: (v is not None, v if v is not None else 0))
    return {v: i + 1 for i, v in enumerate(ordered)}


def volume_parts(keys: Sequence[ImageKey], mosaics: Sequence[str | None] | None = None,
                 orders: Sequence[tuple[Any, ...]] | None = None) -> list[str]:
    """The volume part (key suffix without ``#``) of each image; "" for all when the series is one volume.

    Args:
        keys: one per image (a classic file, a mosaic, a frame; or one per
            distinct key of a multi-frame file: only the set of keys matters).
        mosaics: per image, an id of the mosaic file it comes from (None if not
            a mosaic): mosaics that agree on every key part are numbered ``r<n>``.
        orders: per image, what orders such mosaics (AcquisitionNumber, InstanceNumber, ...).
    """
    mosaics = list(mosaics) if mosaics is not None else [None] * len(keys)
    orders = list(orders) if orders is not None else [()] * len(keys)
    echoes = _rank({k.echo_time for k in keys})
    b_values = {k.b_value for k in keys}
    directions: dict[float | None, dict[Any, int]] = {}
    for b in b_values:
        directions[b] = _rank({k.direction for k in keys if k.b_value == b})
    temporals = {k.temporal for k in keys}
    components = {k.component for k in keys}
    parts = []
    for key in keys:
        part = []
        if len(echoes) > 1:
            part.append(f"e{echoes[key.echo_time]}")
        if len(b_values) > 1 or len(directions[key.b_value]) > 1:
            part.append(f"b{int(key.b_value)}" if key.b_value is not None else "bx")
        if len(directions[key.b_value]) > 1:
            part.append(f"d{directions[key.b_value][key.direction]}")
        if len(temporals) > 1:
            part.append(f"t{key.temporal if key.temporal is not None else 0}")
        if len(components) > 1:
            part.append(_component_name(key.component, components))
        parts.append("-".join(part))
    groups: dict[str, dict[str, tuple[Any, ...]]] = {}
    for part, mosaic, order in zip(parts, mosaics, orders, strict=True):
        if mosaic is not None:
            groups.setdefault(part, {})[mosaic] = order
    repeats = {part: {m: i + 1 for i, m in enumerate(sorted(files, key=lambda m: (files[m], m)))}
               for part, files in groups.items() if len(files) > 1}
    return ["-".join(p for p in (part, f"r{repeats[part][mosaic]}") if p) if part in repeats and mosaic else part
            for part, mosaic in zip(parts, mosaics, strict=True)]


def _component_name(component: str | None, present: set[str | None]) -> str:
    if component is None:  # unmarked images beside marked ones: magnitude unless a magnitude is marked
        return "image" if "M" in present else "mag"
    return _COMPONENT_NAMES[component]


def series_key(series_uid: str, part: str) -> str:
    """Catalog key of a volume: the SeriesInstanceUID, plus ``#part`` when the series holds several."""
    return f"{series_uid}{_SEPARATOR}{part}" if part else series_uid


def split_key(key: str) -> tuple[str, str]:
    """``(series_uid, part)`` of a catalog key; part is "" for a whole series."""
    uid, _, part = key.partition(_SEPARATOR)
    return uid, part


def natural(part: str) -> list[Any]:
    """Sort key that puts ``d2`` before ``d10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)]
