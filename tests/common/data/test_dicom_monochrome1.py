"""MONOCHROME1 (bright = low values) is inverted after rescaling, so every volume reads bright = high."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedmri.data import Volume
from fedmri.data.dicom import SeriesError, load_series
from fedmri.simulations.dicom_writer import write_multi_echo, write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _volume(seed: int, shape: tuple[int, int, int] = (8, 6, 5)) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(100, 2000, shape).astype(np.float32), np.diag([0.9, 0.9, 3.0, 1.0]))


def test_inversion_is_max_plus_min_minus_value_after_rescale(tmp_path: Path) -> None:
    """pydicom's MR_small given a rescale, then relabelled MONOCHROME1: same stored pixels, flipped grey scale."""
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    plain = tmp_path / "mono2"
    ds.save_as(plain)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1"
    ds.save_as(inverted)
    values = load_series([plain]).array
    np.testing.assert_array_equal(values, ds.pixel_array.T.astype(np.float32)[:, :, None] * 2 - 100)
    np.testing.assert_array_equal(load_series([inverted]).array, values.max() + values.min() - values)


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_writer_option_round_trips(tmp_path: Path, enhanced: bool) -> None:
    volume = _volume(1)
    paths = write_series(tmp_path, volume, {}, enhanced=enhanced, monochrome1=True, rng=np.random.default_rng(1))
    ds = pydicom.dcmread(paths[0])
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array if enhanced else ds.pixel_array[None]  # K, rows, cols (classic: the first slice)
    first = volume.array.max() + volume.array.min() - volume.array[:, :, 0].T
    np.testing.assert_array_equal(stored[0], first)  # the file holds the inverted grey scale
    np.testing.assert_array_equal(load_series(paths).array, volume.array)  # and the reader undoes it


def test_float_values_round_trip_within_a_quantisation_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(-50.0, 80.0, (8, 6, 5)).astype(np.float32), np.eye(4))
    back = load_series(write_series(tmp_path, volume, {}, monochrome1=True, rng=rng)).array
    assert np.max(np.abs(back - volume.array)) <= float(np.ptp(volume.array)) / 65535 + 1e-3


def test_each_echo_is_inverted_over_its_own_range(tmp_path: Path) -> None:
    echoes = [_volume(4), Volume(_volume(5).array * 0.1, _volume(5).affine)]  # very different ranges
    (path,) = write_multi_echo(tmp_path, echoes, [5.0, 50.0], {}, enhanced=True, monochrome1=True,
                               rng=np.random.default_rng(4))
    for part, expected in (("e1", echoes[0]), ("e2", echoes[1])):
        np.testing.assert_allclose(load_series([path], volume=part).array, expected.array, atol=0.05)


def test_mixed_monochrome1_and_2_are_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _volume(6), {}, rng=np.random.default_rng(6))
    ds = pydicom.dcmread(paths[2])
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(paths[2])
    with pytest.raises(SeriesError, match=r"mixed MONOCHROME1 \(.*\) and MONOCHROME2 \(.*\).*re-export"):
        load_series(paths)
