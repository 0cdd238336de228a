"""Siemens MOSAIC files that a scanner wrote (nibabel's test data): unpacked, placed, split by b-value."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from fedmri.data.dicom import SeriesError, group_series, load_series, read_header, scan_folder
from fedmri.data.dicom_split import split_key

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
SERIES = "1.3.12.2.1107.5.2.32.35119.2010011420292594820699190.0.0.0"  # CBU_DTI_64D_1A, b=0 and b=1000
SWAP_IJ = np.eye(4)[[1, 0, 2, 3]]  # nibabel's voxel axes are (row, column, slice); ours (column, row, slice)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _wrapper(path: Path):  # nibabel's own reading of the file, the reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "DICOM readers are highly experimental"
        from nibabel.nicom import dicomwrappers
    return dicomwrappers.wrapper_from_data(pydicom.dcmread(path))


@pytest.fixture(scope="module")
def dwi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two DWI mosaics, unzipped under opaque names."""
    folder = tmp_path_factory.mktemp("dwi")
    out = {}
    for b, name in (("0", "IM_A"), ("1000", "IM_B")):
        out[b] = folder / name
        out[b].write_bytes(gzip.decompress((NIBABEL_DATA / f"siemens_dwi_{b}.dcm.gz").read_bytes()))
    return out


def test_header_says_mosaic_with_48_slices_and_b_values(dwi: dict[str, Path]) -> None:
    for b, path in dwi.items():
        header = read_header(path)
        assert header.mosaic and header.mosaic_images == 48
        ((key, count),) = header.image_keys
        assert (key["b_value"], count) == (float(b), 48)
    assert read_header(dwi["1000"]).image_keys[0][0]["direction"] == [1.0, 0.005, -0.005]


def test_b0_and_b1000_mosaics_of_one_series_are_two_volumes(dwi: dict[str, Path]) -> None:
    headers, skipped = scan_folder(dwi["0"].parent)
    volumes, dropped = group_series(headers)
    assert skipped == [] and dropped == []
    assert list(volumes) == [f"{SERIES}#b0", f"{SERIES}#b1000"]
    assert [[h.path for h in volumes[key]] for key in volumes] == [[str(dwi["0"])], [str(dwi["1000"])]]


@pytest.mark.parametrize("b", ["0", "1000"])
def test_each_volume_matches_nibabel(dwi: dict[str, Path], b: str) -> None:
    volume = load_series([dwi["0"], dwi["1000"]], volume=f"b{b}")  # the part picks its mosaic
    wrapper = _wrapper(dwi[b])
    assert volume.shape == (128, 128, 48)
    np.testing.assert_allclose(volume.spacing, [1.796875, 1.796875, 3.0], atol=1e-5)
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ wrapper.affine @ SWAP_IJ, atol=1e-6)
    np.testing.assert_array_equal(volume.array, wrapper.get_data().transpose(1, 0, 2))
    meta = volume.meta
    assert (meta["b_value"], meta["volume"], meta["n_files"]) == (float(b), f"b{b}", 1)
    assert (meta["sequence_family"], meta["plane"], meta["echo_time"]) == ("DWI", "axial", 93.0)


def test_both_mosaics_as_one_volume_name_the_b_values(dwi: dict[str, Path]) -> None:
    with pytest.raises(SeriesError, match=r"share slice positions.*mosaic slice 1.*b-values \(diffusion\): 0\.0 vs "
                                          r"1000\.0.*one volume per echo, b-value"):
        load_series([dwi["0"], dwi["1000"]])
    with pytest.raises(SeriesError, match=r"no volume 'b500' in these files, which hold b0, b1000.*index"):
        load_series([dwi["0"], dwi["1000"]], volume="b500")


def test_csa_header_alone_gives_count_and_b_value(dwi: dict[str, Path], tmp_path: Path) -> None:
    """Exporters that drop the plain Siemens tags keep the CSA header: nibabel reads it."""
    ds = pydicom.dcmread(dwi["1000"])
    block = ds.private_block(0x0019, "SIEMENS MR HEADER")
    for offset in (0x0A, 0x0C, 0x0E):
        del ds[block.get_tag(offset)]
    stripped = tmp_path / "stripped"
    ds.save_as(stripped)
    header = read_header(stripped)
    assert header.mosaic_images == 48 and header.image_keys[0][0]["b_value"] == 1000.0
    assert header.image_keys[0][0]["direction"] is not None  # CSA DiffusionGradientDirection
    volume = load_series([stripped])
    assert volume.shape == (128, 128, 48) and volume.meta["b_value"] == 1000.0
    np.testing.assert_array_equal(volume.array, load_series([dwi["1000"]]).array)


def test_mosaic_without_any_count_is_refused_clearly(dwi: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(dwi["0"])
    for group in (0x0019, 0x0029):  # what an anonymiser that strips private tags leaves
        for elem in list(ds.group_dataset(group)):
            del ds[elem.tag]
    bare = tmp_path / "bare"
    ds.save_as(bare)
    assert read_header(bare).mosaic and read_header(bare).mosaic_images == 0
    with pytest.raises(SeriesError, match=r"bare: Siemens MOSAIC without NumberOfImagesInMosaic.*private tags kept"):
        load_series([bare])


def test_resized_mosaic_is_refused_clearly() -> None:
    """nibabel's 0.dcm: 48 slices claimed, but a 256x256 matrix that 7x7 tiles do not divide."""
    with pytest.raises(SeriesError, match=r"0\.dcm: a mosaic of 48 slices in 7x7 tiles does not fit its 256x256"):
        load_series([NIBABEL_DATA / "0.dcm"])


def test_oblique_mosaic_follows_the_csa_slice_normal(tmp_path: Path) -> None:
    """csa_slice_norm.dcm: a tilted fMRI mosaic (header only; zeros stand in for its pixels)."""
    ds = pydicom.dcmread(NIBABEL_DATA / "csa_slice_norm.dcm")
    ds.add_new(0x7FE00010, "OW", np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes())
    path = tmp_path / "oblique"
    ds.save_as(path)
    volume = load_series([path])
    wrapper = _wrapper(path)
    assert volume.shape == (64, 64, 32) and volume.meta["plane"] == "oblique"
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ wrapper.affine @ SWAP_IJ, atol=1e-5)
    assert split_key(f"{SERIES}#b1000") == (SERIES, "b1000") and split_key(SERIES) == (SERIES, "")


def test_enhanced_mr_from_philips_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "mprage"
    path.write_bytes(gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes()))
    headers, _ = scan_folder(tmp_path)
    volumes, dropped = group_series(headers)
    assert dropped == [] and list(volumes) == [headers[0].series_instance_uid]  # one volume: the plain UID
    volume = load_series([path], volume="")
    assert volume.shape[2] == 176 and volume.meta["volume"] is None


def test_copied_mosaics_are_numbered_repeats(dwi: dict[str, Path], tmp_path: Path) -> None:
    """Two b=0 mosaics of one series (new SOP instances): r1 and r2, by InstanceNumber."""
    shutil.copy(dwi["0"], tmp_path / "first")
    ds = pydicom.dcmread(dwi["0"])
    ds.SOPInstanceUID, ds.InstanceNumber = ds.SOPInstanceUID + ".9", 5
    ds.save_as(tmp_path / "again")
    volumes, _ = group_series(scan_folder(tmp_path)[0])
    assert {key: [Path(h.path).name for h in files] for key, files in volumes.items()} == {
        f"{SERIES}#r1": ["first"], f"{SERIES}#r2": ["again"]}
    assert load_series([tmp_path / "first", tmp_path / "again"], volume="r2").meta["n_files"] == 1
