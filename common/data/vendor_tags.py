"""Vendor private tags: diffusion and mosaic facts that Siemens, GE and Philips keep outside the standard.

Classic MR files carry no standard b-value or gradient direction (Enhanced MR
does, in its functional groups); each vendor writes them in its own private
block. Blocks are found through their private creator
(:meth:`pydicom.dataset.Dataset.private_block`), so a block an exporter moved
to another slot is still read, and pydicom's private dictionary gives their
types. The Siemens CSA image header is parsed by nibabel
(:mod:`nibabel.nicom.csareader`); it is the fallback when the plain Siemens
tags were removed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

__all__ = ["PRIVATE_TAGS", "b_value", "csa_image_header", "ge_complex_component", "gradient_direction",
           "mosaic_images"]

# (group, private creator, element offsets) of what is read.
_SIEMENS = (0x0019, "SIEMENS MR HEADER", (0x0A, 0x0C, 0x0E))  # images in mosaic, B_value, gradient direction
_GE_PARM = (0x0043, "GEMS_PARM_01", (0x2F, 0x39))  # image type (0 mag, 1 phase, 2 real, 3 imag), slop_int_6..9
_GE_ACQU = (0x0019, "GEMS_ACQU_01", (0xBB, 0xBC, 0xBD))  # gradient direction x, y, z
_PHILIPS_B = (0x2001, "Philips Imaging DD 001", (0x03,))  # diffusion b-factor
_PHILIPS_DIR = (0x2005, "Philips MR Imaging DD 001", (0xB0, 0xB1, 0xB2))  # direction RL, AP, FH
_CSA = (0x0029, "SIEMENS CSA HEADER", (0x10,))  # CSA image header (OB)
_BLOCKS = range(0x10, 0x20)  # private creator slots searched; vendors use the first one or two

# Every tag a header-only read must keep for the functions below to see what a full read sees.
PRIVATE_TAGS = sorted({Tag(group, slot) for group, _, _ in (_SIEMENS, _GE_PARM, _GE_ACQU, _PHILIPS_B, _PHILIPS_DIR,
                                                            _CSA) for slot in _BLOCKS}
                      | {Tag(group, (slot << 8) | offset) for group, _, offsets in
                         (_SIEMENS, _GE_PARM, _GE_ACQU, _PHILIPS_B, _PHILIPS_DIR, _CSA)
                         for slot in _BLOCKS for offset in offsets})
# GE adds 1e9 to the b-value in slop_int_6 on some software versions.
_GE_B_OFFSET = 1e9


def _private(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    try:
        block = ds.private_block(group, creator)
    except KeyError:  # no such creator in this file
        return None
    try:
        value = block[offset].value if offset in block else None
    except Exception:  # noqa: BLE001 - a malformed private value is as good as none
        return None
    if isinstance(value, bytes):  # an unknown VR: the text forms (IS, DS) are all we can read safely
        value = value.decode("ascii", "replace").strip("\x00 ").split("\\")
    return value


def _numbers(value: Any) -> list[float]:
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(number):
            return []
        out.append(number)
    return out


def csa_image_header(ds: Dataset) -> dict[str, Any] | None:
    """The Siemens CSA image header as nibabel parses it, or None (not Siemens, removed, or unreadable)."""
    if Tag(0x0029, 0x0010) not in ds:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns on import that its DICOM readers are experimental
        from nibabel.nicom import csareader

    try:
        return csareader.get_csa_header(ds, "image")
    except Exception:  # noqa: BLE001 - a damaged CSA blob must not cost the image
        return None


def _csa_numbers(ds: Dataset, name: str) -> list[float]:
    csa = csa_image_header(ds)
    tag = (csa or {}).get("tags", {}).get(name)
    return _numbers(tag["items"]) if tag and tag.get("items") else []


def b_value(ds: Dataset) -> float | None:
    """Diffusion b-value (s/mm^2) from the vendor's private tags, else None.

    Siemens B_value (0019,xx0C) or its CSA ``B_value``; GE slop_int_6 (0043,xx39,
    first value, less a 1e9 offset some versions add); Philips (2001,xx03).
    """
    for group, creator, offset in ((_SIEMENS[0], _SIEMENS[1], 0x0C), (_GE_PARM[0], _GE_PARM[1], 0x39),
                                   (_PHILIPS_B[0], _PHILIPS_B[1], 0x03)):
        numbers = _numbers(_private(ds, group, creator, offset))
        if numbers:
            b = numbers[0]
            return b % _GE_B_OFFSET if creator == _GE_PARM[1] and b >= _GE_B_OFFSET else b
    numbers = _csa_numbers(ds, "B_value")
    return numbers[0] if numbers else None


def gradient_direction(ds: Dataset) -> tuple[float, float, float] | None:
    """Diffusion gradient direction (unit vector as the vendor wrote it), else None.

    The standard DiffusionGradientOrientation when a classic file has it, then
    Siemens (0019,xx0E) or CSA ``DiffusionGradientDirection``, GE (0019,xxBB-BD),
    Philips (2005,xxB0-B2). A zero vector (b=0, isotropic trace) is None.
    """
    vector = _numbers(ds.get("DiffusionGradientOrientation")) if "DiffusionGradientOrientation" in ds else []
    if len(vector) != 3:
        vector = _numbers(_private(ds, _SIEMENS[0], _SIEMENS[1], 0x0E))
    if len(vector) != 3:
        vector = _csa_numbers(ds, "DiffusionGradientDirection")
    for group, creator, offsets in (_GE_ACQU, _PHILIPS_DIR):
        if len(vector) != 3:
            parts = [_numbers(_private(ds, group, creator, offset)) for offset in offsets]
            vector = [p[0] for p in parts] if all(len(p) == 1 for p in parts) else []
    if len(vector) != 3 or max(abs(v) for v in vector) < 1e-6:
        return None
    return (vector[0], vector[1], vector[2])


def mosaic_images(ds: Dataset) -> int | None:
    """Siemens NumberOfImagesInMosaic: (0019,xx0A), else the CSA header's; None if neither says."""
    numbers = _numbers(_private(ds, _SIEMENS[0], _SIEMENS[1], 0x0A)) or _csa_numbers(ds, "NumberOfImagesInMosaic")
    return int(numbers[0]) if numbers and numbers[0] >= 1 else None


def ge_complex_component(ds: Dataset) -> str | None:
    """GE's private image type (0043,xx2F): "M", "P", "R" or "I"; None when absent."""
    numbers = _numbers(_private(ds, _GE_PARM[0], _GE_PARM[1], 0x2F))
    return {0: "M", 1: "P", 2: "R", 3: "I"}.get(int(numbers[0])) if numbers else None
