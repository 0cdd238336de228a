"""load_nifti: same Volume type and conventions as the DICOM reader."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fedmri.data import Volume, find_files, load_nifti, load_series
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import write_series


def _oblique_affine() -> np.ndarray:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([0.8, 0.9, 2.0])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_array_and_affine_are_kept_as_is(tmp_path: Path, suffix: str) -> None:
    array = np.random.default_rng(0).normal(size=(7, 5, 3)).astype(np.float32)
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(array, _oblique_affine()), path)
    volume = load_nifti(path)
    assert isinstance(volume, Volume) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, _oblique_affine(), atol=1e-6)  # header stores float32
    assert volume.meta["plane"] == "oblique" and volume.meta["shape"] == [7, 5, 3]
    assert volume.meta["voxel_size"] == pytest.approx([0.8, 0.9, 2.0], abs=1e-6)


def test_scaling_is_applied_and_singleton_time_axis_dropped(tmp_path: Path) -> None:
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = load_nifti(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(volume.array, stored[..., 0] * 0.5 + 10.0)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"not nifti at all")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_nifti(tmp_path / "junk.nii")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), tmp_path / "dwi4d.nii.gz")
    with pytest.raises(InputError, match=r"shape \(3, 3, 3, 2\); give one 3D volume"):
        load_nifti(tmp_path / "dwi4d.nii.gz")


@pytest.mark.parametrize(("name", "family"), [
    ("sub-01_T1w.nii.gz", "T1"), ("sub-01_ce-gadolinium_T1w.nii.gz", "T1post"), ("sub-01_T2w.nii.gz", "T2"),
    ("sub-01_FLAIR.nii.gz", "FLAIR"), ("sub-01_dwi.nii.gz", "DWI"), ("sub-01_T2starw.nii", "SWI"),
    ("sub-01_PDw.nii", "PD"), ("lesion_mask.nii.gz", "other"),
])
def test_sequence_family_from_bids_names(tmp_path: Path, name: str, family: str) -> None:
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / name)
    volume = load_nifti(tmp_path / name)
    assert volume.meta["sequence_family"] == family and volume.meta["series_description"] is None


def test_meta_given_by_the_caller_wins(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "sub-01_T1w.nii")
    volume = load_nifti(tmp_path / "sub-01_T1w.nii", meta={"sequence_family": "T2", "body_region": "knee"})
    assert (volume.meta["sequence_family"], volume.meta["body_region"]) == ("T2", "knee")


def test_dicom_and_nifti_agree_through_itk(tmp_path: Path) -> None:
    """ITK converts a DICOM series to NIfTI on its own; both readers must give the same Volume."""
    original = Volume(np.random.default_rng(1).integers(0, 900, (9, 7, 5)).astype(np.float32), _oblique_affine())
    write_series(tmp_path / "dicom", original, {}, rng=np.random.default_rng(1))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "itk.nii.gz"))
    from_dicom = load_series(find_files(tmp_path / "dicom"))
    from_nifti = load_nifti(tmp_path / "itk.nii.gz")
    np.testing.assert_allclose(from_nifti.affine, from_dicom.affine, atol=1e-4)
    np.testing.assert_array_equal(from_nifti.array, from_dicom.array)
