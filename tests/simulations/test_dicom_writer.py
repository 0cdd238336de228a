"""write_series: valid files (pydicom, SimpleITK), exact geometry, faithful pixels, clear errors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from fedmri.data import Volume, find_files, load_series
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import SUPPORTED_TRANSFER_SYNTAXES, write_series

SHAPE = (40, 32, 4)  # JPEG 2000 needs 32 x 32 at least
TAGS = {
    "PatientID": "SYN-0001", "PatientName": "Doe^Jane", "PatientAge": "045Y", "PatientSex": "F",
    "AccessionNumber": "ACC42", "StudyDate": "20240131", "Manufacturer": "SIEMENS", "MagneticFieldStrength": 3,
    "SeriesDescription": "t1_mprage_sag", "BodyPartExamined": "BRAIN", "EchoTime": 2.26, "RepetitionTime": 2300,
    "InversionTime": 900, "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"],
}


def _affine() -> np.ndarray:
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 20.0, -30.0]
    return affine


def _integers(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(0, 4000, SHAPE).astype(np.float32), _affine())


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_files_read_without_warnings_and_round_trip(tmp_path: Path, syntax: str, enhanced: bool) -> None:
    volume = _integers()
    paths = write_series(tmp_path, volume, TAGS, transfer_syntax=syntax, enhanced=enhanced,
                         rng=np.random.default_rng(1))
    assert len(paths) == (1 if enhanced else SHAPE[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in paths:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == syntax
            _ = ds.pixel_array
    back = load_series(paths)
    np.testing.assert_array_equal(back.array, volume.array)  # integer data is stored exactly
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    assert back.meta["transfer_syntax_uid"] == syntax


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                    JPEG2000Lossless], ids=lambda u: u.name)
def test_simpleitk_reads_the_files(tmp_path: Path, syntax: str) -> None:
    volume = _integers(seed=2)
    write_series(tmp_path, volume, TAGS, transfer_syntax=syntax, rng=np.random.default_rng(2))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), volume.array)
    np.testing.assert_allclose(image.GetSpacing(), [0.8, 0.9, 1.5], rtol=1e-6)


@pytest.mark.parametrize("syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_slice_files_are_what_dcmwrite_writes_for_their_dataset(tmp_path: Path, syntax: str) -> None:
    # Slices are assembled from bytes encoded once per series; each file must still be
    # exactly pydicom's encoding of its own dataset, rebuilt here from the decoded values.
    tags = {**TAGS, "InstanceNumber": 99}  # a caller's per-slice tag is overridden, not shared
    paths = write_series(tmp_path, _integers(), tags, transfer_syntax=syntax, rng=np.random.default_rng(10))
    for k, path in enumerate(paths):
        read = pydicom.dcmread(path)
        fresh = Dataset()
        for elem in read:
            fresh.add(DataElement(elem.tag, elem.VR, elem.value))
        fresh.file_meta = read.file_meta
        buffer = io.BytesIO()
        fresh.save_as(buffer, enforce_file_format=True)
        assert buffer.getvalue() == path.read_bytes(), path.name
        assert read.InstanceNumber == k + 1


def test_tags_are_copied_and_metadata_follows(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _integers(), {**TAGS, "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1"},
                         rng=np.random.default_rng(3))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert (ds.PatientID, str(ds.PatientName), ds.PatientAge, ds.SeriesInstanceUID) == (
        "SYN-0001", "Doe^Jane", "045Y", "1.2.826.0.1.3680043.8.498.1")
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == len(paths)
    meta = load_series(paths).meta
    assert (meta["sequence_family"], meta["body_region"], meta["manufacturer"]) == ("T1", "brain", "Siemens")
    assert (meta["patient_age"], meta["field_strength"], meta["accession_number"]) == (45.0, 3.0, "ACC42")


def test_enhanced_functional_groups_carry_the_mr_parameters(tmp_path: Path) -> None:
    (path,) = write_series(tmp_path, _integers(), {**TAGS, "DiffusionBValue": 0}, enhanced=True,
                           rng=np.random.default_rng(4))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "EchoTime" not in ds and "ImagePositionPatient" not in ds
    assert ds.SharedFunctionalGroupsSequence[0].MREchoSequence[0].EffectiveEchoTime == pytest.approx(2.26)
    meta = load_series([path]).meta
    assert (meta["echo_time"], meta["repetition_time"], meta["inversion_time"]) == (2.26, 2300.0, 900.0)
    assert meta["sequence_family"] == "T1"


def test_float_values_are_quantised_within_half_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    volume = Volume(rng.normal(-200.0, 300.0, SHAPE).astype(np.float32), _affine())
    paths = write_series(tmp_path, volume, {}, rng=rng)
    step = float(np.ptp(volume.array)) / 65535
    assert float(pydicom.dcmread(paths[0]).RescaleSlope) == pytest.approx(step, rel=1e-6)
    assert np.max(np.abs(load_series(paths).array - volume.array)) <= step / 2 + 1e-4


def test_negative_integers_are_stored_signed_and_exact(tmp_path: Path) -> None:
    volume = Volume(np.random.default_rng(6).integers(-1000, 3000, SHAPE).astype(np.float32), _affine())
    paths = write_series(tmp_path, volume, {}, transfer_syntax=RLELossless, rng=np.random.default_rng(6))
    assert pydicom.dcmread(paths[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(load_series(paths).array, volume.array)


def test_left_handed_volume_is_written_with_k_reversed(tmp_path: Path) -> None:
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    volume = _integers(seed=7)
    left = Volume(volume.array, _affine() @ flip)  # det < 0: k runs against row x col
    back = load_series(write_series(tmp_path, left, {}, rng=np.random.default_rng(7)))
    np.testing.assert_array_equal(back.array, left.array[:, :, ::-1])
    corner = np.array([3, 5, 0, 1.0])  # voxel (3, 5, 0) of the input is voxel (3, 5, K-1) of the output
    np.testing.assert_allclose(left.affine @ corner, back.affine @ [3, 5, SHAPE[2] - 1, 1.0], atol=1e-9)


def test_same_rng_seed_gives_the_same_uids_and_names(tmp_path: Path) -> None:
    first = write_series(tmp_path / "a", _integers(), {}, rng=np.random.default_rng(8))
    second = write_series(tmp_path / "b", _integers(), {}, rng=np.random.default_rng(8))
    assert [p.name for p in first] == [p.name for p in second]
    uid = lambda p: pydicom.dcmread(p).SOPInstanceUID  # noqa: E731
    assert [uid(p) for p in first] == [uid(p) for p in second]
    assert all(len(p.name) == 16 and "." not in p.name for p in first)  # opaque, no extension


def test_file_names_may_hold_sub_folders(tmp_path: Path) -> None:
    names = [f"study/series/slice{k}" for k in range(SHAPE[2])]
    paths = write_series(tmp_path, _integers(), {}, file_names=names, rng=np.random.default_rng(9))
    assert paths == [tmp_path / n for n in names] and find_files(tmp_path) == sorted(paths)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tags": {"NotAKeyword": 1}}, "not a DICOM keyword"),
    ({"tags": {"ImagePositionPatient": [0, 0, 0]}}, "derived from the volume"),
    ({"tags": {"PatientSex": "MALE-ISH-TOO-LONG-FOR-CS"}}, "invalid value"),
    ({"transfer_syntax": JPEGBaseline8Bit}, "cannot write transfer syntax"),
    ({"file_names": ["one", "two"]}, "file_names has 2 names; 4 file"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"tags": {}, **kwargs}
    with pytest.raises(InputError, match=message):
        write_series(tmp_path, _integers(), args.pop("tags"), rng=np.random.default_rng(0), **args)


def test_bad_volumes(tmp_path: Path) -> None:
    bad = _integers()
    bad.array[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_series(tmp_path, bad, {})
    skew = _affine()
    skew[0, 1] = 0.5  # j axis leans into i
    with pytest.raises(InputError, match="non-orthogonal"):
        write_series(tmp_path, Volume(_integers().array, skew), {})
    small = Volume(np.zeros((16, 16, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="JPEG 2000 needs at least 32x32"):
        write_series(tmp_path, small, {}, transfer_syntax=JPEG2000Lossless)


def test_integer_string_tags_accept_python_ints(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _integers(), {**TAGS, "SeriesNumber": 7, "EchoTrainLength": 12},
                         rng=np.random.default_rng(4))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert (int(ds.SeriesNumber), int(ds.EchoTrainLength)) == (7, 12)
