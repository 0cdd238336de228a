"""Finding files, header-only reads, skip reasons and series grouping."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from fedmri.data import Volume
from fedmri.data.dicom import (
    DicomHeader,
    SkipInput,
    Skipped,
    find_files,
    group_series,
    load_series,
    read_header,
    scan_folder,
)
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped, never downloaded


def _series(folder: Path, seed: int, n_slices: int = 3, **kwargs: object) -> list[Path]:
    rng = np.random.default_rng(seed)
    volume = Volume(rng.integers(0, 1000, (8, 6, n_slices)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    tags = {"PatientID": f"P{seed}", "AccessionNumber": f"A{seed}", "StudyInstanceUID": f"1.2.3.{seed}"}
    return write_series(folder, volume, tags, rng=rng, **kwargs)  # type: ignore[arg-type]


def test_find_files_is_recursive_sorted_and_ignores_names(tmp_path: Path) -> None:
    names = ["a/b/c/IM0001", "a/z.dcm", "weird name é", ".hidden", "x/no_extension", "x/y/DICOMDIR"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_files(tmp_path)
    assert found == sorted(tmp_path / name for name in names)
    assert find_files(tmp_path / "a/z.dcm") == [tmp_path / "a/z.dcm"]
    with pytest.raises(InputError, match="does not exist"):
        find_files(tmp_path / "missing")


def test_header_of_written_files(tmp_path: Path) -> None:
    paths = _series(tmp_path / "classic", seed=1)
    header = read_header(paths[0])
    ds = pydicom.dcmread(paths[0])
    assert header.path == str(paths[0]) and header.size == paths[0].stat().st_size
    assert header.mtime_ns == paths[0].stat().st_mtime_ns
    assert (header.sop_instance_uid, header.series_instance_uid) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    assert (header.study_instance_uid, header.patient_id, header.accession_number) == ("1.2.3.1", "P1", "A1")
    assert (header.modality, header.number_of_frames) == ("MR", 1)
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert json.loads(json.dumps(dataclasses.asdict(header))) == dataclasses.asdict(header)
    (enhanced,) = _series(tmp_path / "enhanced", seed=2, n_slices=5, enhanced=True)
    assert read_header(enhanced).number_of_frames == 5


def _truncated(tmp_path: Path, size: int) -> Path:
    (path,) = _series(tmp_path / "src", seed=3, n_slices=1)
    out = tmp_path / f"cut{size}"
    out.write_bytes(path.read_bytes()[:size])
    return out


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: d / "notes.txt", "not a DICOM file"),
    (lambda d: d / "empty", "empty file"),
    (lambda d: d / "noise.bin", "not a DICOM file"),
    (lambda d: PYDICOM_FILES / "CT_small.dcm", "modality CT, not MR"),
    (lambda d: PYDICOM_FILES / "test-SR.dcm", "modality SR, not MR"),
    (lambda d: PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", "DICOMDIR"),
    (lambda d: _truncated(d, 10), "not a DICOM file"),
    (lambda d: _truncated(d, 200), "truncated|not a DICOM"),
    (lambda d: _truncated(d, 400), "truncated"),
])
def test_skip_reasons(tmp_path: Path, make: object, reason: str) -> None:
    (tmp_path / "notes.txt").write_text("patient list\nnot an image\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SkipInput, match=reason):
        read_header(make(tmp_path))  # type: ignore[operator]


def test_mr_screenshot_is_skipped(tmp_path: Path) -> None:
    (path,) = _series(tmp_path, seed=4, n_slices=1)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.save_as(path)
    with pytest.raises(SkipInput, match="not an MR image"):
        read_header(path)


def test_file_without_preamble_or_file_meta_is_read(tmp_path: Path) -> None:
    """Old exports write the bare dataset; pydicom needs force=True for them."""
    (path,) = _series(tmp_path / "src", seed=5, n_slices=1)
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "raw"
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert read_header(raw).transfer_syntax_uid == "1.2.840.10008.1.2"
    np.testing.assert_array_equal(load_series([raw]).array, load_series([path]).array)


def test_group_series_splits_by_series_and_drops_repeated_instances(tmp_path: Path) -> None:
    first = _series(tmp_path / "exam" / "s1", seed=6, n_slices=3)
    second = _series(tmp_path / "exam" / "s2", seed=7, n_slices=2)
    copy = tmp_path / "exam" / "zz_copy" / "again"
    copy.parent.mkdir()
    shutil.copy(first[1], copy)
    headers, skipped = scan_folder(tmp_path)
    assert skipped == [] and len(headers) == 6
    series, duplicates = group_series(headers)
    uid1, uid2 = (pydicom.dcmread(p[0]).SeriesInstanceUID for p in (first, second))
    assert sorted(series) == sorted([uid1, uid2])
    assert sorted(h.path for h in series[uid1]) == sorted(map(str, first))
    assert duplicates == [Skipped(str(copy), f"duplicate of {first[1]} (same SOPInstanceUID)")]


def test_scan_of_a_real_export_with_other_modalities_and_dicomdir() -> None:
    """pydicom's dicomdirtests: real MR, CT and CR files under opaque names, DICOMDIRs, READMEs."""
    root = PYDICOM_FILES / "dicomdirtests"
    headers, skipped = scan_folder(root)
    assert len(headers) + len(skipped) == len(find_files(root))
    assert headers and all(isinstance(h, DicomHeader) and h.modality == "MR" for h in headers)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "DICOMDIR" in reasons["DICOMDIR"] and "not a DICOM file" in reasons["README.txt"]
    assert any("modality CT" in r for r in reasons.values()) and any("modality CR" in r for r in reasons.values())
