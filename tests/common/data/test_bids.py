"""BIDS intake: images by suffix, sidecars with inheritance, participants.tsv, everything else listed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmri.config import load_config
from fedmri.data.bids import scan_bids
from fedmri.data.catalog_db import open_catalog, series_rows
from fedmri.data.indexer import index_site
from fedmri.errors import InputError

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])


def _image(path: Path, seed: int = 0, shape: tuple[int, ...] = (20, 18, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).uniform(0, 500, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([1.2, 1.2, 3.0, 1.0])), path)


def _json(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


def make_bids(root: Path) -> Path:
    """A small dataset with what real ones hold besides the images."""
    _json(root / "dataset_description.json", {"Name": "hospital export", "BIDSVersion": "1.9.0"})
    (root / "README").write_text("Converted with dcm2niix.\n")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t34\tF\nsub-02\t89+\tmale\n"
                                           "sub-03\tabc\tX\n")
    _json(root / "T1w.json", {"Manufacturer": "GE MEDICAL SYSTEMS", "MagneticFieldStrength": 1.5})  # inherited
    anat = root / "sub-01" / "ses-01" / "anat"
    _image(anat / "sub-01_ses-01_T1w.nii.gz", 1)
    _json(anat / "sub-01_ses-01_T1w.json", {"Manufacturer": "Siemens", "MagneticFieldStrength": 3,
                                            "EchoTime": 0.0025, "RepetitionTime": 2.3, "InversionTime": 0.9,
                                            "SeriesDescription": "t1_mprage_sag", "StudyInstanceUID": "1.2.3.4"})
    _image(anat / "sub-01_ses-01_FLAIR.nii", 3)
    _image(root / "sub-01" / "ses-01" / "func" / "sub-01_ses-01_task-rest_bold.nii.gz", 4, (8, 8, 4, 3))
    _image(root / "sub-02" / "anat" / "sub-02_T2w.nii.gz", 5)
    _image(root / "sub-02" / "anat" / "sub-02_ce-gadolinium_T1w.nii.gz", 2)
    _image(root / "sub-02" / "anat" / "sub-02_mod-T1w_defacemask.nii.gz", 6)
    _image(root / "sub-02" / "anat" / "sub-03_T2w.nii.gz", 7)
    (root / "sub-02" / "anat" / "notes.txt").write_text("motion\n")
    _image(root / "sub-02" / "dwi" / "sub-02_dwi.nii.gz", 8)
    (root / "sub-02" / "dwi" / "sub-02_dwi.bval").write_text("1000\n")
    (root / "sub-02" / "dwi" / "sub-02_dwi.bvec").write_text("1\n0\n0\n")
    _image(root / "derivatives" / "lesions" / "sub-01" / "anat" / "sub-01_desc-lesion_mask.nii.gz", 9)
    return root


def test_scan_reads_suffix_sidecars_and_participants(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "bids")
    scan = scan_bids(root)
    assert sorted(job.uid for job in scan.jobs) == [
        "sub-01_ses-01_FLAIR", "sub-01_ses-01_T1w", "sub-02_T2w", "sub-02_ce-gadolinium_T1w", "sub-02_dwi"]
    own, inherited = scan.meta["sub-01_ses-01_T1w"], scan.meta["sub-02_ce-gadolinium_T1w"]
    assert own["manufacturer"] == "Siemens" and own["field_strength"] == 3.0 and own["sequence_family"] == "T1"
    assert own["echo_time"] == pytest.approx(2.5) and own["repetition_time"] == pytest.approx(2300.0)
    assert own["inversion_time"] == pytest.approx(900.0) and own["series_description"] == "t1_mprage_sag"
    assert inherited["manufacturer"] == "GE" and inherited["field_strength"] == 1.5  # from the root's T1w.json
    assert inherited["sequence_family"] == "T1post"  # the ce- entity
    assert scan.meta["sub-01_ses-01_FLAIR"]["sequence_family"] == "FLAIR"
    assert "manufacturer" not in scan.meta["sub-01_ses-01_FLAIR"]  # T1w.json is not a FLAIR sidecar
    assert scan.meta["sub-02_dwi"]["sequence_family"] == "DWI" and scan.meta["sub-02_T2w"]["sequence_family"] == "T2"
    jobs = {job.uid: job for job in scan.jobs}
    assert (jobs["sub-01_ses-01_T1w"].patient, jobs["sub-01_ses-01_T1w"].study) == ("01", "1.2.3.4")
    assert jobs["sub-01_ses-01_FLAIR"].study == "sub-01/ses-01" and jobs["sub-02_T2w"].study == "sub-02"
    assert {(r.series_instance_uid, r.age, r.sex, r.findings) for r in scan.labels} >= {
        ("sub-01_ses-01_T1w", 34.0, "F", None), ("sub-02_T2w", 89.0, "M", None)}
    reasons = {s.path.removeprefix(str(root) + "/"): s.reason for s in scan.skipped}
    assert set(reasons) == {"participants.tsv:4", "sub-01/ses-01/func/", "sub-02/anat/notes.txt", "derivatives/",
                            "sub-02/anat/sub-02_mod-T1w_defacemask.nii.gz", "sub-02/anat/sub-03_T2w.nii.gz"}
    assert "'abc'" in reasons["participants.tsv:4"] and "'x'" in reasons["participants.tsv:4"]
    assert "func data is not indexed" in reasons["sub-01/ses-01/func/"]
    assert "defacing mask" in reasons["sub-02/anat/sub-02_mod-T1w_defacemask.nii.gz"]
    misplaced = reasons["sub-02/anat/sub-03_T2w.nii.gz"]
    assert "sub-03" in misplaced and "must agree" in misplaced
    assert "labels.csv" in reasons["derivatives/"]
    assert scan.n_files == 17


def test_index_bids_dataset_with_reports_and_labels(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "bids")
    reports = tmp_path / "reports.csv"
    reports.write_text("accession_number,study_instance_uid,findings,impression\n"
                       ",sub-01/ses-01,Periventricular lesions.,Consistent with MS.\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("series_instance_uid,findings,age,sex,mask\nsub-01_ses-01_FLAIR,wmh,35.5,,\n")
    empty = tmp_path / "dicom"
    empty.mkdir()
    result = index_site(empty, reports, tmp_path / "cat", labels=labels, bids=root, cfg=CFG)
    conn = open_catalog(tmp_path / "cat")
    rows = {r["series_uid"]: r for r in series_rows(conn)}
    conn.close()
    assert set(rows) == {job.uid for job in scan_bids(root).jobs} and result.n_series == 5
    t1 = rows["sub-01_ses-01_T1w"]
    assert (t1["source_kind"], t1["sequence"], t1["vendor"]) == ("bids", "T1", "Siemens")
    assert (t1["age"], t1["sex"]) == (34.0, "F")  # participants.tsv
    assert t1["meta"]["echo_time"] == pytest.approx(2.5) and t1["meta"]["bids_suffix"] == "T1w"
    flair = rows["sub-01_ses-01_FLAIR"]
    assert flair["report_impression"] == "Consistent with MS."
    assert t1["report_impression"] is None  # its sidecar names its DICOM study, 1.2.3.4
    assert (flair["age"], flair["sex"], flair["label_findings"]) == (35.5, "F", ["wmh"])  # labels.csv over participants
    assert rows["sub-02_ce-gadolinium_T1w"]["sequence"] == "T1post"
    assert t1["patient_id"] == flair["patient_id"] != rows["sub-02_T2w"]["patient_id"]

    again = index_site(empty, reports, tmp_path / "cat", labels=labels, bids=root, cfg=CFG)
    assert (again.n_loaded, again.n_series) == (0, result.n_series)
    sidecar = root / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.json"
    sidecar.write_text(sidecar.read_text().replace("Siemens", "Philips Medical Systems"))
    edited = index_site(empty, reports, tmp_path / "cat", labels=labels, bids=root, cfg=CFG)
    assert edited.n_loaded == 1 and edited.n_preprocessed == 0  # read again, same voxels: the cache holds
    conn = open_catalog(tmp_path / "cat")
    assert {r["series_uid"]: r["vendor"] for r in series_rows(conn)}["sub-01_ses-01_T1w"] == "Philips"
    conn.close()


def test_bids_root_given_as_the_data_folder_is_detected(tmp_path: Path) -> None:
    """A site admin points the command at the dataset itself, catalog inside it."""
    root = tmp_path / "bids"
    _json(root / "dataset_description.json", {"Name": "x", "BIDSVersion": "1.9.0"})
    _image(root / "sub-07" / "anat" / "sub-07_T2w.nii.gz")
    (tmp_path / "reports.csv").write_text("accession_number,study_instance_uid,findings,impression\n")
    catalog = root / "derivatives" / "fedmri"  # where BIDS keeps derived data: not listed as a skipped input
    result = index_site(root, tmp_path / "reports.csv", catalog, cfg=CFG)
    assert (result.n_series, result.exit_code, result.n_files) == (1, 0, 2), result.skipped
    again = index_site(root, tmp_path / "reports.csv", catalog, cfg=CFG)
    assert (again.n_loaded, again.exit_code) == (0, 0)


def test_folder_without_dataset_description_is_refused(tmp_path: Path) -> None:
    (tmp_path / "reports.csv").write_text("accession_number,study_instance_uid,findings,impression\n")
    (tmp_path / "dicom").mkdir()
    with pytest.raises(InputError, match="dataset_description.json"):
        index_site(tmp_path / "dicom", tmp_path / "reports.csv", tmp_path / "cat", bids=tmp_path / "dicom", cfg=CFG)
    assert not (tmp_path / "cat").exists()
