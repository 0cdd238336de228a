"""A tiny hospital on disk for catalog, CLI and dataset tests (not a test module).

Series are small (24 x 20 x 6 voxels) so a whole site indexes in a second or
two; DICOM files come from the project's writer, never from a hand-made one.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.data import get_testdata_file

from fedmri.data.volume import Volume
from fedmri.simulations.dicom_writer import write_series

SHAPE = (24, 20, 6)
DESCRIPTIONS = ("t1_mprage_sag", "t2_tse_tra", "t2_flair_tra")


@dataclass
class Site:
    """Paths of a written site and the UIDs it holds (for assertions)."""

    root: Path
    dicom: Path
    reports: Path
    labels: Path
    series_uids: list[str] = field(default_factory=list)
    series_dirs: list[Path] = field(default_factory=list)
    patients: dict[str, str] = field(default_factory=dict)  # series uid -> PatientID


def _volume(rng: np.random.Generator, index: int) -> Volume:
    affine = np.diag([-1.2, -1.1, 3.0, 1.0])  # axial DICOM: i -> left-to-right flipped, right-handed
    affine[:3, 3] = [20.0 + index, 15.0, -10.0]
    ijk = np.indices(SHAPE).astype(np.float32)
    centre = np.array(SHAPE, np.float32)[:, None, None, None] / 2 + rng.uniform(-3, 3, (3, 1, 1, 1))
    blob = np.exp(-((ijk - centre) ** 2).sum(0) / 18.0)
    array = 100.0 + 800.0 * blob + rng.normal(0, 10, SHAPE)
    return Volume(np.round(array).astype(np.float32), affine)


def make_site(root: Path, n_patients: int = 3, series_per_patient: int = 2, seed: int = 0,
              with_mask: bool = True) -> Site:
    """Write ``n_patients * series_per_patient`` good series, reports and labels under ``root``."""
    rng = np.random.default_rng(seed)
    site = Site(root=root, dicom=root / "dicom", reports=root / "reports.csv", labels=root / "labels.csv")
    report_rows, label_rows = [], []
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        patient_id, study_uid, accession = f"PAT{seed}{p:03d}", f"1.2.826.0.1.{seed}.{p}", f"ACC{seed}{p:03d}"
        for s in range(series_per_patient):
            volume = _volume(rng, p * series_per_patient + s)
            series_uid = f"{study_uid}.{s + 1}"
            folder = site.dicom / f"study{p}" / f"s{s}"
            write_series(folder, volume, {
                "PatientID": patient_id, "PatientAge": f"0{40 + p}Y", "PatientSex": "MF"[p % 2],
                "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "AccessionNumber": accession,
                "Manufacturer": ("SIEMENS", "GE MEDICAL SYSTEMS")[s % 2], "MagneticFieldStrength": 3.0,
                "SeriesDescription": DESCRIPTIONS[s % len(DESCRIPTIONS)], "BodyPartExamined": "BRAIN",
            }, rng=rng)
            site.series_uids.append(series_uid)
            site.series_dirs.append(folder)
            site.patients[series_uid] = patient_id
            mask = ""
            if with_mask and p == 0 and s == 0:
                mask = "masks/m0.nii.gz"
                nib.save(nib.Nifti1Image((volume.array > 500).astype(np.uint8), volume.affine), root / mask)
            label_rows.append([series_uid, "mass" if p % 2 == 0 else "", f"{40.5 + p}", "MF"[p % 2], mask])
        report_rows.append([accession, study_uid, f"Findings of patient {p}.", f"Impression {p}."])
    _write_csv(site.reports, ["accession_number", "study_instance_uid", "findings", "impression"], report_rows)
    _write_csv(site.labels, ["series_instance_uid", "findings", "age", "sex", "mask"], label_rows)
    return site


def add_bad_inputs(site: Site) -> dict[str, str]:
    """Add every kind of bad input; returns {what: path} for assertions."""
    bad = site.dicom / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    paths = {
        "truncated": shutil.copy(get_testdata_file("MR_truncated.dcm"), bad / "a1"),
        "ct": shutil.copy(get_testdata_file("CT_small.dcm"), bad / "a2"),
        "text": bad / "notes.txt",
    }
    paths["text"].write_text("not an image\n")
    # A duplicated file: the same SOP instance exported twice.
    first = sorted(site.series_dirs[0].iterdir())[0]
    paths["duplicate"] = shutil.copy(first, bad / "copy_of_a_slice")
    # A series with a missing slice (not the first or last, so positions show a gap).
    rng = np.random.default_rng(99)
    gap_dir = site.dicom / "gappy"
    files = write_series(gap_dir, _volume(rng, 50), {
        "PatientID": "PATGAP", "StudyInstanceUID": "1.2.826.0.9", "SeriesInstanceUID": "1.2.826.0.9.1",
        "AccessionNumber": "ACCGAP", "SeriesDescription": "t2_tse_tra", "BodyPartExamined": "BRAIN",
    }, rng=rng)
    files[2].unlink()
    paths["gap"] = gap_dir
    with open(site.reports, "a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["ACCNONE", "1.2.3.4.5.6", "Orphan report.", "No study."])
    with open(site.reports, "ab") as fh:
        fh.write("ACC0001,1.2.826.0.1.0.1,Läsion,Befund\n".encode("latin-1"))
    with open(site.labels, "a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["9.9.9.9", "mass", "50", "M", ""])
        csv.writer(fh).writerow([site.series_uids[-1], "tumour", "abc", "M", ""])
    return {k: str(v) for k, v in paths.items()}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
