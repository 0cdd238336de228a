"""Lesion masks as hospitals keep them: DICOM SEG (highdicom) and NIfTI on any grid, onto the series' grid."""

from __future__ import annotations

import csv
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from fedmri.config import load_config
from fedmri.data.catalog_db import open_catalog, series_rows
from fedmri.data.dicom import load_series
from fedmri.data.geometry import slice_normal
from fedmri.data.indexer import index_site
from fedmri.data.masks import load_mask, read_seg_header, resample_nearest
from fedmri.data.preprocess import VolumeCache
from fedmri.data.volume import Volume
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import write_series

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])
SHAPE = (24, 20, 8)
AXIAL = np.array([[-1.2, 0, 0, 20.0], [0, -1.1, 0, 15.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
# Sagittal slices, rows running down the patient: exercises the LPS/RAS flip and the axis order.
SAGITTAL = np.array([[0, 0, -3.0, 12.0], [1.2, 0, 0, -14.0], [0, -1.1, 0, 30.0], [0, 0, 0, 1]])


def _series(folder: Path, uid: str, affine: np.ndarray = AXIAL, seed: int = 0) -> tuple[list[Path], Volume]:
    """A series with a bright blob, written by the project's writer and read back by its reader."""
    rng = np.random.default_rng(seed)
    ijk = np.indices(SHAPE).astype(np.float32)
    blob = np.exp(-((ijk - np.array([9, 8, 4], np.float32)[:, None, None, None]) ** 2).sum(0) / 8.0)
    array = np.round(100 + 800 * blob + rng.normal(0, 5, SHAPE)).astype(np.float32)
    paths = write_series(folder, Volume(array, affine), {
        "PatientID": "PSEG", "StudyInstanceUID": "1.2.826.0.7", "SeriesInstanceUID": uid, "AccessionNumber": "ASEG",
        "StudyDate": "20240101", "SeriesDescription": "t2_tse_tra", "BodyPartExamined": "BRAIN"}, rng=rng)
    return paths, load_series(paths)


def _write_seg(paths: list[Path], labels: np.ndarray, out: Path, kind: str = "BINARY") -> Path:
    """A DICOM SEG over the series ``paths``; ``labels`` (I, J, K) on its grid, values = segment numbers.

    For ``FRACTIONAL``, ``labels`` is (I, J, K, segments) of probabilities.
    """
    sources = [dcmread(p) for p in paths]
    normal = slice_normal([float(v) for v in sources[0].ImageOrientationPatient])
    sources.sort(key=lambda ds: np.dot([float(v) for v in ds.ImagePositionPatient], normal))  # the reader's k
    frames = np.moveaxis(labels, (0, 1, 2), (2, 1, 0))  # K, rows = J, columns = I (, segments)
    n_segments = labels.shape[3] if kind == "FRACTIONAL" else int(labels.max())
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=f"lesion {n}", algorithm_type="MANUAL",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion) for n in range(1, n_segments + 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames.astype(np.float32 if kind == "FRACTIONAL" else np.uint8),
        segmentation_type=kind, segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=90,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedmri-tests", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0")
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


def _lesion(volume: Volume) -> np.ndarray:
    labels = (volume.array > 500).astype(np.uint8)  # I, J, K
    labels[(volume.array > 750)] = 2  # the core: a second segment
    return labels


@pytest.mark.parametrize("affine", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_seg_lands_on_the_voxels_it_was_drawn_on(affine: np.ndarray, tmp_path: Path) -> None:
    paths, volume = _series(tmp_path / "mr", "1.2.826.0.7.1", affine)
    labels = _lesion(volume)
    seg = _write_seg(paths, labels, tmp_path / "seg.dcm")
    assert read_seg_header(seg).referenced_series == ("1.2.826.0.7.1",)
    mask = load_mask(seg, volume, "1.2.826.0.7.1")
    assert mask.shape == volume.shape and np.allclose(mask.affine, volume.affine)
    np.testing.assert_array_equal(mask.array, labels)  # empty frames omitted by highdicom come back as 0
    assert set(np.unique(mask.array)) == {0, 1, 2}


def test_fractional_seg_is_thresholded_at_one_half(tmp_path: Path) -> None:
    paths, volume = _series(tmp_path / "mr", "1.2.826.0.7.2")
    probabilities = np.zeros((*SHAPE, 2), np.float32)
    probabilities[5:9, 4:8, 3, 0] = 0.8
    probabilities[6:8, 5:7, 3, 1] = 0.9  # segment 2 inside segment 1: the higher number wins
    probabilities[15:18, 10:12, 5, 0] = 0.3  # unlikely: background
    seg = _write_seg(paths, probabilities, tmp_path / "frac.dcm", kind="FRACTIONAL")
    mask = load_mask(seg, volume, "1.2.826.0.7.2").array
    expected = np.zeros(SHAPE, np.uint8)
    expected[5:9, 4:8, 3] = 1
    expected[6:8, 5:7, 3] = 2
    np.testing.assert_array_equal(mask, expected)


def test_nifti_on_another_grid_is_resampled_by_nearest_neighbour(tmp_path: Path) -> None:
    _, volume = _series(tmp_path / "mr", "1.2.826.0.7.3")
    labels = _lesion(volume)
    # Half the in-plane spacing, first axis reversed: fine voxels 2i and 2i+1 straddle series voxel i.
    fine = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)[::-1]
    to_series = np.array([[-0.5, 0, 0, SHAPE[0] - 0.75], [0, 0.5, 0, -0.25], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(fine, volume.affine @ to_series), tmp_path / "fine.nii.gz")
    mask = load_mask(tmp_path / "fine.nii.gz", volume, "any")
    np.testing.assert_array_equal(mask.array, labels)
    values, inside = resample_nearest(labels, volume.affine, volume.shape, volume.affine)
    assert inside.all() and np.array_equal(values, labels)


def test_masks_that_cannot_belong_to_the_series_are_refused(tmp_path: Path) -> None:
    paths, volume = _series(tmp_path / "mr", "1.2.826.0.7.4")
    far = np.eye(4)
    far[:3, 3] = 500.0
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), far), tmp_path / "far.nii.gz")
    with pytest.raises(InputError, match="does not overlap the series"):
        load_mask(tmp_path / "far.nii.gz", volume, "x")
    # Covers the series, but the lesion lies beside it.
    big = np.zeros((80, 80, 60), np.uint8)
    big[0:3, 0:3, 0:3] = 1
    wide = np.diag([1.0, 1.0, 1.0, 1.0])
    wide[:3, 3] = [-40.0, -40.0, -30.0]
    nib.save(nib.Nifti1Image(big, wide), tmp_path / "beside.nii.gz")
    with pytest.raises(InputError, match="none of its 27 labelled voxels"):
        load_mask(tmp_path / "beside.nii.gz", volume, "x")
    seg = _write_seg(paths, _lesion(volume), tmp_path / "seg.dcm")
    with pytest.raises(InputError, match=r"drawn on series 1\.2\.826\.0\.7\.4, not on 9\.9"):
        load_mask(seg, volume, "9.9")
    (tmp_path / "notes.txt").write_text("no mask\n")
    with pytest.raises(InputError, match="neither a NIfTI file"):
        load_mask(tmp_path / "notes.txt", volume, "x")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.uint8), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="one 3D label image"):
        load_mask(tmp_path / "4d.nii.gz", volume, "x")


def test_index_attaches_seg_files_and_masks_on_other_grids(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    uids = [f"1.2.826.0.7.{n}" for n in range(10, 15)]
    series = {uid: _series(dicom / f"s{n}", uid, seed=n) for n, uid in enumerate(uids)}
    _, volume = series[uids[1]]
    # In the DICOM folder: a SEG for series 0, one for series 4 (whose labels.csv row names a mask), one of a
    # series that is not there.
    _write_seg(series[uids[0]][0], _lesion(series[uids[0]][1]), dicom / "seg" / "0001")
    _write_seg(series[uids[4]][0], _lesion(series[uids[4]][1]), dicom / "seg" / "0002")
    _, stray = _series(tmp_path / "elsewhere", "1.2.826.0.7.99")
    _write_seg(sorted((tmp_path / "elsewhere").iterdir()), _lesion(stray), dicom / "seg" / "0003")
    # Named in labels.csv: a NIfTI on a finer grid, a SEG inside the DICOM folder (read once, as the mask), a mask
    # far away.
    fine = np.repeat(_lesion(volume), 2, axis=2)
    nib.save(nib.Nifti1Image(fine, volume.affine @ np.diag([1.0, 1.0, 0.5, 1.0])), tmp_path / "fine.nii.gz")
    _write_seg(series[uids[2]][0], _lesion(series[uids[2]][1]), dicom / "seg" / "named.dcm")
    far = np.eye(4)
    far[:3, 3] = 900.0
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), far), tmp_path / "far.nii.gz")
    nib.save(nib.Nifti1Image(_lesion(series[uids[4]][1]), series[uids[4]][1].affine), tmp_path / "m4.nii.gz")
    (tmp_path / "reports.csv").write_text("accession_number,study_instance_uid,findings,impression\n")
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["series_instance_uid", "findings", "age", "sex", "mask"])
        writer.writerows([[uids[1], "mass", "", "", "fine.nii.gz"], [uids[2], "mass", "", "", "dicom/seg/named.dcm"],
                          [uids[3], "", "", "", "far.nii.gz"], [uids[4], "mass", "", "", "m4.nii.gz"]])

    result = index_site(dicom, tmp_path / "reports.csv", tmp_path / "cat", labels=tmp_path / "labels.csv", cfg=CFG)
    assert result.n_series == 5 and result.exit_code == 3
    reasons = {s.path: s.reason for s in result.skipped}
    assert set(reasons) == {str(dicom / "seg" / "0002"), str(dicom / "seg" / "0003"), str(tmp_path / "far.nii.gz")}
    assert "labels.csv line 5 gives its mask" in reasons[str(dicom / "seg" / "0002")]
    stray_reason = reasons[str(dicom / "seg" / "0003")]
    assert "1.2.826.0.7.99" in stray_reason and "not among the DICOM files" in stray_reason
    far_reason = reasons[str(tmp_path / "far.nii.gz")]
    assert "does not overlap" in far_reason and uids[3] in far_reason
    conn = open_catalog(tmp_path / "cat")
    rows = {r["series_uid"]: r for r in series_rows(conn)}
    conn.close()
    assert {uid: bool(r["has_mask"]) for uid, r in rows.items()} == {
        uids[0]: True, uids[1]: True, uids[2]: True, uids[3]: False, uids[4]: True}
    assert rows[uids[0]]["mask_source"] == str(dicom / "seg" / "0001") and rows[uids[0]]["label_findings"] is None
    assert rows[uids[1]]["label_findings"] == ["mass"] and rows[uids[3]]["label_findings"] == []
    cache = VolumeCache(tmp_path / "cat" / "cache")
    for uid in (uids[0], uids[1], uids[2]):
        assert set(np.unique(cache.load(rows[uid]["cache_key"]).mask)) >= {0, 1}  # the lesion survived preprocessing

    again = index_site(dicom, tmp_path / "reports.csv", tmp_path / "cat", labels=tmp_path / "labels.csv", cfg=CFG)
    assert again.n_headers_read == 0 and again.n_loaded == 1  # only the series whose mask failed is read again
    assert sorted((s.path, s.reason) for s in again.skipped) == sorted((s.path, s.reason) for s in result.skipped)
