"""data.index: localizers, reformats, phase images, thin series and long time series are listed, not indexed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedmri.config import load_config
from fedmri.data import Volume
from fedmri.data.dicom import group_series, load_series, scan_folder
from fedmri.data.selection import SelectionSettings, derived_reason, localizer_reason
from fedmri.errors import ConfigError
from fedmri.simulations.dicom_writer import write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped, never downloaded
DEFAULTS = SelectionSettings()


def _series(folder: Path, uid: str, seed: int, n_slices: int = 6, **tags: object) -> list[Path]:
    rng = np.random.default_rng(seed)
    volume = Volume(rng.integers(0, 1000, (8, 6, n_slices)).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    base = {"SeriesInstanceUID": uid, "StudyInstanceUID": "1.2.3", "FrameOfReferenceUID": "1.2.3.9",
            "PatientID": "P1"}
    return write_series(folder, volume, {**base, **tags}, rng=rng)


def _group(root: Path, settings: SelectionSettings = DEFAULTS) -> tuple[list[str], dict[str, str]]:
    headers, unread = scan_folder(root)
    assert unread == []
    volumes, skipped = group_series(headers, settings)
    return list(volumes), {s.reason.rsplit(" [series ", 1)[1].split(",")[0]: s.reason for s in skipped}


@pytest.mark.parametrize(("image_type", "description", "expected"), [
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], "", "ImageType LOCALIZER"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "AAHead_Scout_32ch-head-coil", "AAHead_Scout"),
    (["ORIGINAL", "PRIMARY", "OTHER"], "3-Plane Loc", "3-Plane Loc"),
    (["ORIGINAL", "PRIMARY", "OTHER"], "3pl loc SSFSE", "3pl loc"),
    (["ORIGINAL", "PRIMARY", "M_FFE"], "SmartSurvey", "SmartSurvey"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "localiser", "localiser"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "t1_mprage_sag", None),
    (["ORIGINAL", "PRIMARY", "M", "ND"], "fMRI block design", None),  # "loc" inside a word is not a localizer
    (["ORIGINAL", "PRIMARY", "M", "ND"], "Ax T2 FLAIR", None),
])
def test_localizer_rule(image_type: list[str], description: str, expected: str | None) -> None:
    reason = localizer_reason(image_type, description, "")
    assert (reason is None) if expected is None else (expected in reason)  # type: ignore[operator]


@pytest.mark.parametrize(("image_type", "derived"), [
    (["DERIVED", "SECONDARY", "MPR", "CSA MPR", "", "CSAPARALLEL", "M", "ND", "NORM"], True),  # Siemens MPR
    (["DERIVED", "SECONDARY", "PROJECTION IMAGE", "MIP"], True),
    (["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"], True),  # GE reformat
    (["DERIVED", "SECONDARY", "SCREEN SHOT"], True),
    (["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"], False),  # ADC maps are data
    (["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"], False),
    (["DERIVED", "SECONDARY", "OTHER"], False),  # pydicom's MR_small
    (["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], False),
])
def test_derived_rule(image_type: list[str], derived: bool) -> None:
    assert (derived_reason(image_type) is not None) == derived


def test_real_siemens_mpr_and_single_slice_files(tmp_path: Path) -> None:
    """pydicom's examples_overlay.dcm is a Siemens MPR; MR_small is one slice of a real series."""
    names = ("examples_overlay.dcm", "MR_small.dcm")
    for name in names:
        (tmp_path / name).write_bytes((PYDICOM_FILES / name).read_bytes())
    kept, reasons = _group(tmp_path)
    assert kept == []
    mpr, small = (pydicom.dcmread(PYDICOM_FILES / n).SeriesInstanceUID for n in names)
    assert "reformat, projection" in reasons[mpr] and "ImageType DERIVED\\SECONDARY\\MPR" in reasons[mpr]
    assert "data.index.skip_derived=false" in reasons[mpr]
    assert "1 slice(s), fewer than data.index.min_slices=5" in reasons[small]
    kept, reasons = _group(tmp_path, SelectionSettings.keep_all())
    assert sorted(kept) == sorted([mpr, small]) and reasons == {}


def test_localizer_series_is_skipped_and_can_be_kept(tmp_path: Path) -> None:
    _series(tmp_path / "loc", "1.2.3.1", 1, n_slices=9, SeriesDescription="AAHead_Scout",
            ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])
    _series(tmp_path / "t2", "1.2.3.2", 2, SeriesDescription="t2_tse_tra")
    kept, reasons = _group(tmp_path)
    assert kept == ["1.2.3.2"]
    assert reasons["1.2.3.1"].startswith("localizer/scout (description 'AAHead_Scout'): planning images")
    assert "9 file(s)" in next(s.reason for s in group_series(scan_folder(tmp_path)[0], DEFAULTS)[1])
    kept, _ = _group(tmp_path, SelectionSettings(skip_localizers=False))
    assert sorted(kept) == ["1.2.3.1", "1.2.3.2"]


def test_phase_beside_magnitude_in_one_series(tmp_path: Path) -> None:
    _series(tmp_path / "mag", "1.2.3.1", 1, ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], SeriesDescription="swi")
    _series(tmp_path / "pha", "1.2.3.1", 2, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"], SeriesDescription="swi")
    kept, reasons = _group(tmp_path)
    assert kept == ["1.2.3.1#mag"]
    assert reasons["1.2.3.1#phase"].startswith("phase image beside the magnitude image of the same series")
    kept, _ = _group(tmp_path, SelectionSettings(skip_phase=False))
    assert kept == ["1.2.3.1#mag", "1.2.3.1#phase"]


def test_phase_series_of_a_protocol_with_a_magnitude_series(tmp_path: Path) -> None:
    common = {"ProtocolName": "gre_field_mapping", "SeriesDescription": "gre_field_mapping"}
    _series(tmp_path / "mag", "1.2.3.1", 1, ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], **common)
    _series(tmp_path / "pha", "1.2.3.2", 2, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"], **common)
    _series(tmp_path / "alone", "1.2.3.3", 3, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"], ProtocolName="pc_flow")
    kept, reasons = _group(tmp_path)
    assert sorted(kept) == ["1.2.3.1", "1.2.3.3"]  # a phase series without a magnitude partner stays
    assert "of protocol 'gre_field_mapping', whose magnitude image is series 1.2.3.1" in reasons["1.2.3.2"]


def test_long_series_keeps_its_first_volumes_and_lists_the_rest_once(tmp_path: Path) -> None:
    for t in range(1, 6):
        _series(tmp_path / f"t{t}", "1.2.3.1", t, TemporalPositionIdentifier=t, SeriesDescription="perfusion")
    headers = scan_folder(tmp_path)[0]
    volumes, skipped = group_series(headers, SelectionSettings(max_volumes_per_series=2))
    assert list(volumes) == ["1.2.3.1#t1", "1.2.3.1#t2"]
    (entry,) = skipped
    assert entry.path == str(tmp_path)
    assert "holds 5 volumes" in entry.reason and "3 are not" in entry.reason
    assert "[series 1.2.3.1#t3 ... 1.2.3.1#t5, 18 file(s)]" in entry.reason


def test_diffusion_maps_are_kept_with_their_family(tmp_path: Path) -> None:
    _series(tmp_path / "adc", "1.2.3.1", 1, ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"],
            SeriesDescription="ep2d_diff_3scan_trace_p2_ADC")
    _series(tmp_path / "trace", "1.2.3.2", 2, ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"],
            SeriesDescription="ep2d_diff_3scan_trace_p2_TRACEW", DiffusionBValue=1000)
    kept, reasons = _group(tmp_path)
    assert sorted(kept) == ["1.2.3.1", "1.2.3.2"] and reasons == {}
    families = [load_series(sorted((tmp_path / f).iterdir())).meta["sequence_family"] for f in ("adc", "trace")]
    assert families == ["ADC", "DWI"]


def test_settings_come_from_the_config_and_are_checked() -> None:
    assert SelectionSettings.from_config(load_config("tiny").data.index) == SelectionSettings()
    cfg = load_config("tiny", overrides=["data.index.min_slices=12", "data.index.skip_phase=false"])
    assert SelectionSettings.from_config(cfg.data.index) == SelectionSettings(min_slices=12, skip_phase=False)
    with pytest.raises(ConfigError, match=r"data.index.min_slices=0 must be at least 1"):
        SelectionSettings(min_slices=0)
    with pytest.raises(ConfigError, match=r"max_volumes_per_series=-1 must be >= 0"):
        SelectionSettings(max_volumes_per_series=-1)
    with pytest.raises(ConfigError):
        load_config("tiny", overrides=["data.index.skip_scouts=true"])  # unknown keys are errors
