"""load_series geometry proven against an independent reader (SimpleITK / GDCM).

Series are written with write_series in four acquisition planes; SimpleITK
reads the same files. SimpleITK reports LPS origin and direction, and
GetArrayFromImage returns (k, j, i).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fedmri.data import Volume, find_files, load_series
from fedmri.simulations.dicom_writer import write_series

from helpers.geometry import LPS, PLANES

SHAPE = (20, 14, 7)  # non-square, so an i/j swap shows
SPACING = (0.7, 0.9, 2.5)


def _volume(direction: np.ndarray, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(SPACING)
    affine[:3, 3] = [12.3, -45.6, 78.9]
    return Volume(rng.normal(300.0, 50.0, SHAPE).astype(np.float32), affine)


@pytest.fixture(scope="module", params=[(plane, enhanced) for plane in PLANES for enhanced in (False, True)],
                ids=lambda p: f"{p[0]}-{'enhanced' if p[1] else 'classic'}")
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    plane, enhanced = request.param
    volume = _volume(PLANES[plane], seed=len(plane))
    folder = tmp_path_factory.mktemp(f"{plane}{int(enhanced)}")
    write_series(folder, volume, {"SeriesDescription": "t2_tse"}, enhanced=enhanced, rng=np.random.default_rng(0))
    return plane, enhanced, folder, volume


def _sitk_read(folder: Path, enhanced: bool) -> sitk.Image:
    if enhanced:
        return sitk.ReadImage(str(find_files(folder)[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_matches_simpleitk(written: tuple) -> None:
    plane, enhanced, folder, original = written
    volume = load_series(find_files(folder))
    image = _sitk_read(folder, enhanced)
    assert volume.shape == tuple(image.GetSize()) == SHAPE
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(volume.origin_ras, LPS @ np.array(image.GetOrigin()), atol=1e-3)
    direction_ras = LPS @ np.array(image.GetDirection()).reshape(3, 3)  # columns are the i, j, k axes
    np.testing.assert_allclose(volume.affine[:3, :3] / np.array(volume.spacing), direction_ras, atol=1e-4)
    sitk_array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # k, j, i -> i, j, k
    np.testing.assert_allclose(volume.array, sitk_array, atol=1e-3, rtol=1e-6)
    assert volume.meta["plane"] == plane


def test_round_trip_reproduces_array_and_affine(written: tuple) -> None:
    _plane, _enhanced, folder, original = written
    volume = load_series(find_files(folder))
    np.testing.assert_allclose(volume.affine, original.affine, atol=1e-6)
    step = float(np.ptp(original.array)) / 65535  # one uint16 quantisation step
    assert np.max(np.abs(volume.array - original.array)) <= step / 2 + 1e-4


def test_classic_and_enhanced_give_the_same_volume(tmp_path: Path) -> None:
    original = _volume(PLANES["oblique"], seed=3)
    write_series(tmp_path / "classic", original, {}, rng=np.random.default_rng(1))
    write_series(tmp_path / "enhanced", original, {}, enhanced=True, rng=np.random.default_rng(1))
    classic = load_series(find_files(tmp_path / "classic"))
    enhanced = load_series(find_files(tmp_path / "enhanced"))
    np.testing.assert_array_equal(classic.array, enhanced.array)
    np.testing.assert_allclose(classic.affine, enhanced.affine, atol=1e-9)
    assert (classic.meta["n_files"], enhanced.meta["n_files"]) == (SHAPE[2], 1)


def test_order_comes_from_positions_not_names_or_instance_numbers(tmp_path: Path) -> None:
    original = _volume(PLANES["sagittal"], seed=4)
    rng = np.random.default_rng(5)
    # names sort in reverse slice order; InstanceNumber is a shuffle
    names = [f"IMG{SHAPE[2] - k:03d}" for k in range(SHAPE[2])]
    paths = write_series(tmp_path, original, {}, file_names=names, rng=rng)
    for path, number in zip(paths, rng.permutation(len(paths)) + 1, strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(number)
        ds.save_as(path)
    shuffled = [paths[i] for i in rng.permutation(len(paths))]
    volume = load_series(shuffled)
    np.testing.assert_allclose(volume.affine, original.affine, atol=1e-6)
    np.testing.assert_allclose(volume.array, original.array, atol=0.01)


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    original = _volume(PLANES["axial"], seed=6)
    paths = write_series(tmp_path, original, {}, rng=np.random.default_rng(2))
    for path in paths:  # 2.5 mm apart, but 1 mm thick slices with a gap and no SpacingBetweenSlices
        ds = pydicom.dcmread(path)
        ds.SliceThickness = 1.0
        del ds.SpacingBetweenSlices
        ds.save_as(path)
    assert load_series(paths).spacing[2] == pytest.approx(SPACING[2], abs=1e-6)


def test_per_frame_rescale_in_enhanced_mr(tmp_path: Path) -> None:
    """PixelValueTransformationSequence per frame overrides the shared one."""
    original = _volume(PLANES["axial"], seed=7)
    (path,) = write_series(tmp_path, original, {}, enhanced=True, rng=np.random.default_rng(3))
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    slope, intercept = float(shared.RescaleSlope), float(shared.RescaleIntercept)
    frame = ds.PerFrameFunctionalGroupsSequence[2]
    frame.PixelValueTransformationSequence = [pydicom.Dataset()]
    frame.PixelValueTransformationSequence[0].RescaleSlope = 2 * slope
    frame.PixelValueTransformationSequence[0].RescaleIntercept = intercept + 10
    ds.save_as(path)
    volume = load_series([path])
    stored = (original.array[:, :, 2] - intercept) / slope
    np.testing.assert_allclose(volume.array[:, :, 2], stored * 2 * slope + intercept + 10, atol=2 * slope)
    np.testing.assert_allclose(volume.array[:, :, 3], original.array[:, :, 3], atol=slope)
