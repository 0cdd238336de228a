"""NIfTI (.nii / .nii.gz) into the same :class:`~fedmri.data.Volume` as DICOM.

nibabel's affine is already voxel -> RAS+ mm, which is the Volume convention,
so it is kept as is (sform when set, else qform: nibabel's own choice).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmri.data.metadata import series_metadata
from fedmri.data.volume import Volume
from fedmri.errors import InputError

__all__ = ["load_nifti"]


def load_nifti(path: str | Path, meta: Mapping[str, Any] | None = None) -> Volume:
    """Read a 3D NIfTI image.

    The sequence family is guessed from the file name and the header's
    ``descrip`` (BIDS suffixes ``_T1w``, ``_T2w``, ``_FLAIR``, ``_dwi``,
    ``_T2starw`` work; anything else gives "other"); pass ``meta`` to state it.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        meta: ``Volume.meta`` entries that override what the file says
            (e.g. ``{"sequence_family": "T2", "body_region": "knee"}``).

    Returns:
        The volume with float32 values (scl_slope/scl_inter applied) and the file's affine.

    Raises:
        InputError: missing or unreadable file, or an image that is not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"NIfTI file {path} does not exist")
    try:
        image = nib.load(path)
        array = image.get_fdata(dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise InputError(f"{path}: not a readable NIfTI image ({exc})") from exc
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]  # a trailing singleton time/channel axis is still one volume
    if array.ndim != 3:
        raise InputError(f"{path}: image has shape {array.shape}; give one 3D volume (split 4D series first)")
    description = _description(image)
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    tags = {"SeriesDescription": " ".join(p for p in (stem, description) if p)}
    info = series_metadata(tags, image.affine, array.shape, transfer_syntax_uid=None, n_files=1)
    info["series_description"] = description or None  # the file name is not a description
    info.update(meta or {})
    return Volume(np.ascontiguousarray(array), image.affine, info)


def _description(image: Any) -> str:
    try:
        raw = image.header["descrip"]
    except (KeyError, TypeError):
        return ""
    value = raw.item() if hasattr(raw, "item") else raw
    text = value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("\x00 ")
