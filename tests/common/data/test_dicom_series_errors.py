"""Series that cannot form one volume fail with a SeriesError a site admin can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fedmri.data import Volume
from fedmri.data.dicom import SeriesError, load_series
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SPACING = 2.0


def _write(folder: Path, n_slices: int = 6, shape: tuple[int, int] = (8, 6), seed: int = 0, **kwargs: object
           ) -> list[Path]:
    rng = np.random.default_rng(seed)
    volume = Volume(rng.integers(0, 1000, (*shape, n_slices)).astype(np.float32),
                    np.diag([0.5, 0.5, SPACING, 1.0]))
    return write_series(folder, volume, {"EchoTime": 20.0}, rng=rng, **kwargs)  # type: ignore[arg-type]


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_series_error_is_an_input_error() -> None:
    assert issubclass(SeriesError, InputError)
    with pytest.raises(SeriesError, match="empty series"):
        load_series([])


def test_missing_slice(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    with pytest.raises(SeriesError, match=r"slice missing between .* jump 4\.00 mm where slices are 2\.00 mm apart"):
        load_series(paths[:2] + paths[3:])


def test_several_missing_slices(tmp_path: Path) -> None:
    paths = _write(tmp_path, n_slices=8)
    with pytest.raises(SeriesError, match="about 2 slices missing"):
        load_series(paths[:3] + paths[5:])


def test_duplicate_position_names_both_files_and_the_difference(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    extra = tmp_path / "second_echo"
    extra.write_bytes(paths[2].read_bytes())
    _edit(extra, SOPInstanceUID=generate_uid(), EchoTime=80.0)
    with pytest.raises(SeriesError, match=r"share slice positions.*second_echo.*echo times \(multi-echo\)") as info:
        load_series([*paths, extra])
    assert str(paths[2]) in str(info.value)


def test_duplicate_frames_in_enhanced_mr(tmp_path: Path) -> None:
    (path,) = _write(tmp_path, enhanced=True)
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[3].PlanePositionSequence[0].ImagePositionPatient = frames[2].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(path)
    with pytest.raises(SeriesError, match=r"frame 3 and .* frame 4"):
        load_series([path])


def test_mixed_orientation_is_called_a_localizer(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[4], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(SeriesError, match=r"mixed slice orientations.*axial, sagittal.*localizer"):
        load_series(paths)


def test_mixed_matrix_size(tmp_path: Path) -> None:
    paths = _write(tmp_path / "a")
    other = _write(tmp_path / "b", shape=(10, 6), seed=1)
    with pytest.raises(SeriesError, match=r"mixed matrix sizes 6x8 \(5 images\), 6x10 \(1 images\)"):
        load_series(paths[:5] + other[5:])


def test_mixed_pixel_spacing(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[1], PixelSpacing=[0.6, 0.5])
    with pytest.raises(SeriesError, match="mixed pixel spacing"):
        load_series(paths)


def test_irregular_spacing(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    ipp = [float(v) for v in pydicom.dcmread(paths[2]).ImagePositionPatient]
    _edit(paths[2], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.6 * SPACING])
    with pytest.raises(SeriesError, match="irregular slice spacing"):
        load_series(paths)


def test_missing_geometry(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[0], ImagePositionPatient=None)
    with pytest.raises(SeriesError, match="ImagePositionPatient: cannot place the image in space"):
        load_series(paths)


def test_truncated_pixel_data_is_reported_not_fatal() -> None:
    with pytest.raises(SeriesError, match=r"MR_truncated\.dcm: cannot decode pixel data"):
        load_series([PYDICOM_FILES / "MR_truncated.dcm"])


def test_file_without_pixels_and_non_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SeriesError, match="notes.txt"):
        load_series([text])


def test_colour_image_is_refused() -> None:
    with pytest.raises(SeriesError, match="colour image"):
        load_series([PYDICOM_FILES / "SC_rgb_rle.dcm"])


@pytest.mark.parametrize(("tags", "spacing"), [
    ({"SpacingBetweenSlices": 3.0, "SliceThickness": 2.0}, 3.0),
    ({"SpacingBetweenSlices": None, "SliceThickness": 2.5}, 2.5),
    ({"SpacingBetweenSlices": None, "SliceThickness": None}, 1.0),
])
def test_one_slice_series_takes_spacing_from_the_nominal_tags(tmp_path: Path, tags: dict, spacing: float) -> None:
    (path,) = _write(tmp_path, n_slices=1)
    _edit(path, **tags)
    volume = load_series([path])
    assert volume.shape[2] == 1 and volume.spacing[2] == pytest.approx(spacing)


def test_slices_off_the_line_are_refused_and_a_steady_shift_is_kept(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    ipps = [[float(v) for v in pydicom.dcmread(p).ImagePositionPatient] for p in paths]
    for k, (path, ipp) in enumerate(zip(paths, ipps, strict=True)):  # each slice 0.3 mm further along x
        _edit(path, ImagePositionPatient=[ipp[0] + 0.3 * k, ipp[1], ipp[2]])
    step_ras = load_series(paths).affine[:3, 2]
    np.testing.assert_allclose(step_ras, [-0.3, 0.0, SPACING], atol=1e-6)  # LPS x is RAS -x
    _edit(paths[3], ImagePositionPatient=[ipps[3][0] + 5.0, ipps[3][1], ipps[3][2]])
    with pytest.raises(SeriesError, match="do not lie on one straight line"):
        load_series(paths)


def test_degenerate_orientation(tmp_path: Path) -> None:
    paths = _write(tmp_path, n_slices=2)
    _edit(paths[0], ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    with pytest.raises(SeriesError, match="not two unit, perpendicular directions"):
        load_series(paths)
