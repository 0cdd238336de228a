"""A synthetic site folder on disk: what is in it, and whether we may write it.

``site.json`` is written first with ``"complete": false`` and rewritten with
``"complete": true`` at the end, so a folder records which generator and
parameters made it and whether the run finished. A folder is only ever
reused (complete, same parameters) or regenerated (incomplete, same
parameters); anything else is refused, so two federations never mix.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmri.data.site_inputs import LABEL_COLUMNS, REPORT_COLUMNS  # noqa: F401 -- sd.REPORT_COLUMNS
from fedmri.errors import InputError

GENERATOR = "fedmri.simulations.synth"
# Bump when the same parameters would produce different files.
FORMAT_VERSION = 2
# What the generator writes into a site folder; nothing else is ever deleted.
OWNED = ("dicom", "masks", "reports.csv", "labels.csv", "series.csv", "site.json", "site.json.tmp")

# The reports and labels files are what `fedmri data index` reads (fedmri.data.site_inputs).
SERIES_COLUMNS = ("series_instance_uid", "study_instance_uid", "accession_number", "patient_id", "region",
                  "sequence_family", "plane", "tilt_deg", "fat_sat", "contrast", "shape", "voxel_size", "dicom_dir")


def generator_params(seed: int, site_index: int, preset: str, series_per_site: int,
                     case_mix: str = "site") -> dict[str, Any]:
    """The parameters that fully determine a site folder's content."""
    return {"generator": GENERATOR, "format": FORMAT_VERSION, "seed": seed, "site_index": site_index,
            "preset": preset, "series_per_site": series_per_site, "case_mix": case_mix}


def read_site_json(path: Path) -> dict[str, Any] | None:
    """The folder's site.json, or None when absent or unreadable."""
    try:
        return json.loads((path / "site.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def site_state(path: Path, params: Mapping[str, Any]) -> str:
    """Decide what to do with a site folder.

    Returns:
        "new" (absent or empty), "done" (complete, same parameters: reuse) or
        "redo" (our own interrupted run with the same parameters).

    Raises:
        InputError: the folder is a file, holds something else, or was made
            with other parameters.
    """
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; the site folder must be a directory. Choose another --out.")
    if not path.exists() or not any(path.iterdir()):
        return "new"
    info = read_site_json(path)
    if info is None or info.get("params", {}).get("generator") != GENERATOR:
        raise InputError(f"{path} is not empty and was not written by fedmri's synthetic-site generator; "
                         "choose an empty --out folder or remove it")
    if info["params"] != dict(params):
        diff = {k: (info["params"].get(k), v) for k, v in params.items() if info["params"].get(k) != v}
        raise InputError(f"{path} holds a synthetic site made with other parameters (existing, requested: {diff}); "
                         "use the same parameters, another --out folder, or delete it first")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OWNED)
    if foreign:
        raise InputError(f"{path} holds files the generator did not write ({', '.join(foreign)}); "
                         "move them away or choose another --out folder")
    return "done" if info.get("complete") else "redo"


def clear_owned(path: Path) -> None:
    """Remove what an interrupted run of the generator left (and nothing else)."""
    for name in OWNED:
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename), so a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """UTF-8 CSV with a header, csv-module quoting, '\\n' line ends (byte-identical across runs)."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow(row)
