"""BIDS naming and layout rules: which file of a dataset is an image, metadata, or not indexed.

From the BIDS specification: a file name is ``<key>-<label>`` entities joined by
``_``, then ``_<suffix>`` and the extension; raw images lie in
``sub-<label>/[ses-<label>/]<datatype>/`` and their names repeat the folders'
entities. Only the structural datatypes (:data:`DATATYPES`) are indexed.
"""

from __future__ import annotations

import re

__all__ = ["DATATYPES", "NOT_IMAGES", "TOP_METADATA", "classify", "parse_name"]

DATATYPES = ("anat", "dwi")
NOT_IMAGES = {"defacemask": "a defacing mask, not an image"}
TOP_METADATA = {"dataset_description.json", "participants.tsv", "participants.json", "samples.tsv", "samples.json",
                "genetic_info.json", ".bidsignore", "CHANGES", "LICENSE"}
_NAME = re.compile(r"^((?:[a-z]+-[a-zA-Z0-9]+_)*)([a-zA-Z0-9]+)(\.[a-z.]+)$")
_HINTS = {"derivatives": "; a lesion mask there can be given in labels.csv's mask column",
          "sourcedata": "; to index the DICOM originals instead, give that folder as the DICOM folder"}


def classify(parts: tuple[str, ...]) -> tuple[int | None, str]:
    """What one file of a dataset is, from its path relative to the dataset root.

    Args:
        parts: the relative path's components, e.g. ``("sub-01", "anat", "sub-01_T1w.nii.gz")``.

    Returns:
        ``(None, "image")`` for a structural image; ``(None, "")`` for metadata
        (sidecars, participants.tsv, README); ``(None, reason)`` for a file not
        used; ``(n, reason)`` when the whole folder ``parts[:n]`` is not indexed
        (``derivatives/``, ``func/``), so it is listed once.
    """
    name, top = parts[-1], parts[0]
    if len(parts) == 1:
        if name in TOP_METADATA or name.startswith("README") or (name.endswith(".json") and parse_name(name)):
            return None, ""
        return None, "not a BIDS file (the dataset root holds dataset_description.json, participants.tsv, README)"
    if not top.startswith("sub-"):
        return 1, f"BIDS {top}/ folder is not indexed (only the raw images under sub-*/ are){_HINTS.get(top, '')}"
    datatype_at = 2 if parts[1].startswith("ses-") else 1
    if len(parts) <= datatype_at + 1:  # sessions.tsv, scans.tsv, inherited sidecars
        meta = name.endswith(("_sessions.tsv", "_scans.tsv", ".json"))
        return None, "" if meta else "not a BIDS file at the subject or session level"
    datatype = parts[datatype_at]
    if datatype not in DATATYPES:
        return datatype_at + 1, (f"BIDS {datatype} data is not indexed: only structural images "
                                 f"({', '.join(d + '/' for d in DATATYPES)}) are")
    if len(parts) != datatype_at + 2:
        return None, f"not in the BIDS layout sub-<label>/[ses-<label>/]{datatype}/<file>"
    if name.endswith((".json", ".bval", ".bvec")):
        return None, ""  # sidecars, read with their image
    if not name.endswith((".nii", ".nii.gz")):
        return None, "not a BIDS image (.nii or .nii.gz)"
    parsed = parse_name(name)
    if parsed is None or "sub" not in parsed[0]:
        return None, ("file name is not a BIDS name: sub-<label>[_ses-<label>][_<key>-<label>...]_<suffix>"
                      ".nii[.gz]; rename it or give it to --nifti instead")
    entities, suffix, _ = parsed
    folder_entities = {p.split("-", 1)[0]: p.split("-", 1)[1] for p in parts[:datatype_at]}
    wrong = [f"{k}-{entities.get(k, '?')}" for k, v in folder_entities.items() if entities.get(k) != v]
    if wrong:
        return None, (f"file name says {', '.join(wrong)} but it lies in {'/'.join(parts[:datatype_at])}/; "
                      "BIDS names and folders must agree")
    if suffix in NOT_IMAGES:
        return None, f"{NOT_IMAGES[suffix]} (BIDS suffix _{suffix})"
    return None, "image"


def parse_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """``(entities, suffix, extension)`` of a BIDS file name, or ``None``.

    ``sub-01_ses-02_acq-fast_T1w.nii.gz`` gives ``({"sub": "01", "ses": "02",
    "acq": "fast"}, "T1w", ".nii.gz")``; ``T1w.json`` (an inherited sidecar) gives ``({}, "T1w", ".json")``.
    """
    match = _NAME.match(name)
    if match is None:
        return None
    pairs = [p.split("-", 1) for p in match.group(1).split("_") if p]
    entities = dict(pairs)
    if len(entities) != len(pairs):
        return None  # an entity given twice
    return entities, match.group(2), match.group(3)
