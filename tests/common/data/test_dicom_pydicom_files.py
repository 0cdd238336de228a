"""Real MR files that no one here wrote: pydicom's MR_small in every transfer syntax it ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fedmri.data.dicom import SeriesError, load_series, read_header

# The package folder, not get_testdata_file: that one tries a download for files it lacks.
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
VARIANTS = [
    "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm",
]


@pytest.fixture(scope="module")
def reference() -> tuple:
    path = PYDICOM_FILES / "MR_small.dcm"
    return load_series([path]), pydicom.dcmread(path)


def test_reference_pixels_and_geometry(reference: tuple) -> None:
    volume, ds = reference
    assert volume.shape == (64, 64, 1) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[:, :, 0], ds.pixel_array.T)  # i = column, j = row
    # ImagePositionPatient is LPS; the affine is RAS; the one slice is SliceThickness thick
    np.testing.assert_allclose(volume.origin_ras, [83.9063, 91.2, 6.6406])
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-0.3125, -0.3125, 0.8]))


def test_reference_matches_simpleitk(reference: tuple) -> None:
    volume, _ = reference
    image = sitk.ReadImage(str(PYDICOM_FILES / "MR_small.dcm"))
    np.testing.assert_allclose(volume.spacing[:2], image.GetSpacing()[:2], rtol=1e-4)
    np.testing.assert_allclose(volume.origin_ras, np.diag([-1, -1, 1]) @ np.array(image.GetOrigin()), atol=1e-3)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def test_reference_metadata(reference: tuple) -> None:
    meta = reference[0].meta
    assert (meta["manufacturer"], meta["model"], meta["patient_sex"]) == ("Canon", "MRT50H1", "F")  # TOSHIBA_MEC
    assert (meta["plane"], meta["study_date"], meta["n_files"]) == ("axial", "2004-08-26", 1)
    assert (meta["echo_time"], meta["repetition_time"]) == (240.0, 4000.0)
    assert meta["sequence_family"] == "T2"  # SE, TR 4000 TE 240: physics rule, no description
    assert meta["voxel_size"] == pytest.approx([0.3125, 0.3125, 0.8])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_transfer_syntax_decodes_to_the_same_volume(reference: tuple, name: str) -> None:
    volume = load_series([PYDICOM_FILES / name])
    np.testing.assert_array_equal(volume.array, reference[0].array)
    np.testing.assert_array_equal(volume.affine, reference[0].affine)
    assert volume.meta["transfer_syntax_uid"] == read_header(PYDICOM_FILES / name).transfer_syntax_uid


def test_truncated_file_is_reported_not_fatal() -> None:
    header = read_header(PYDICOM_FILES / "MR_truncated.dcm")  # the header is intact ...
    assert header.modality == "MR"
    with pytest.raises(SeriesError, match="cannot decode pixel data"):  # ... the pixel data is short
        load_series([header.path])
