"""One series, several volumes: echoes, vendor b-values and directions, time points; keys that stay put."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from fedmri.data import Volume
from fedmri.data.dicom import group_series, load_series, read_header, scan_folder
from fedmri.data.dicom_split import ImageKey, volume_parts
from fedmri.errors import InputError
from fedmri.simulations.dicom_writer import write_multi_echo, write_series

SERIES = "1.2.826.0.1.3680043.8.498.77"
SHAPE = (8, 6, 5)


def _volume(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(0, 2000, SHAPE).astype(np.float32), np.diag([0.9, 0.9, 3.0, 1.0]))


def _part(folder: Path, volume: Volume, seed: int, **tags: object) -> list[Path]:
    base = {"SeriesInstanceUID": SERIES, "StudyInstanceUID": "1.2.3.4", "FrameOfReferenceUID": "1.2.3.5",
            "PatientID": "P1", "SeriesDescription": "Ax diffusion"}
    return write_series(folder, volume, {**base, **tags}, rng=np.random.default_rng(seed))


def _set_private(paths: list[Path], group: int, creator: str, values: dict[int, tuple[str, object]]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        block = ds.private_block(group, creator, create=True)
        for offset, (vr, value) in values.items():
            block.add_new(offset, vr, value)
        ds.save_as(path)


def _keys(root: Path) -> dict[str, list[str]]:
    volumes, skipped = group_series(scan_folder(root)[0])
    assert skipped == []
    return {key: sorted(Path(h.path).parent.name for h in files) for key, files in volumes.items()}


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_multi_echo_series_gives_one_volume_per_echo(tmp_path: Path, enhanced: bool) -> None:
    echoes = [_volume(1), _volume(2), _volume(3)]
    paths = write_multi_echo(tmp_path, echoes, [30.0, 4.5, 12.0], {"SeriesInstanceUID": SERIES},
                             enhanced=enhanced, rng=np.random.default_rng(0))
    assert len(paths) == (1 if enhanced else 15)
    volumes, _ = group_series(scan_folder(tmp_path)[0])
    assert list(volumes) == [f"{SERIES}#e1", f"{SERIES}#e2", f"{SERIES}#e3"]  # shortest echo first
    for part, echo, expected in (("e1", 4.5, echoes[1]), ("e2", 12.0, echoes[2]), ("e3", 30.0, echoes[0])):
        files = [h.path for h in volumes[f"{SERIES}#{part}"]]
        assert len(files) == (1 if enhanced else 5)
        volume = load_series(files, volume=part)
        np.testing.assert_array_equal(volume.array, expected.array)
        np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-9)
        assert (volume.meta["echo_time"], volume.meta["volume"]) == (echo, part)


def test_ge_b_values_with_the_1e9_offset(tmp_path: Path) -> None:
    for b, seed, slop in (("0", 1, ["0", "8", "0", "0"]), ("1000", 2, ["1000001000", "8", "0", "0"])):
        paths = _part(tmp_path / f"b{b}", _volume(seed), seed, Manufacturer="GE MEDICAL SYSTEMS")
        _set_private(paths, 0x0043, "GEMS_PARM_01", {0x39: ("IS", slop)})
    assert _keys(tmp_path) == {f"{SERIES}#b0": ["b0"] * 5, f"{SERIES}#b1000": ["b1000"] * 5}
    volume = load_series(sorted((tmp_path / "b1000").iterdir()), volume="b1000")
    assert (volume.meta["b_value"], volume.meta["sequence_family"]) == (1000.0, "DWI")


def test_philips_b_values_and_directions(tmp_path: Path) -> None:
    for name, b, direction, seed in (("iso", 0.0, None, 1), ("x", 1000.0, (1.0, 0.0, 0.0), 2),
                                     ("y", 1000.0, (0.0, 1.0, 0.0), 3)):
        paths = _part(tmp_path / name, _volume(seed), seed, Manufacturer="Philips Medical Systems")
        _set_private(paths, 0x2001, "Philips Imaging DD 001", {0x03: ("FL", b)})
        if direction is not None:
            _set_private(paths, 0x2005, "Philips MR Imaging DD 001",
                         {0xB0 + i: ("FL", v) for i, v in enumerate(direction)})
    # directions sorted by their components: (0, 1, 0) before (1, 0, 0)
    assert _keys(tmp_path) == {f"{SERIES}#b0": ["iso"] * 5, f"{SERIES}#b1000-d1": ["y"] * 5,
                               f"{SERIES}#b1000-d2": ["x"] * 5}
    assert load_series(sorted((tmp_path / "x").iterdir())).meta["b_value"] == 1000.0


def test_siemens_classic_b_value_tag(tmp_path: Path) -> None:
    for b, seed in (("0", 1), ("800", 2)):
        paths = _part(tmp_path / f"b{b}", _volume(seed), seed, Manufacturer="SIEMENS")
        _set_private(paths, 0x0019, "SIEMENS MR HEADER", {0x0C: ("IS", b)})
    assert list(_keys(tmp_path)) == [f"{SERIES}#b0", f"{SERIES}#b800"]


def test_time_points_of_a_dynamic_series(tmp_path: Path) -> None:
    for t in (1, 2, 10):
        _part(tmp_path / f"t{t}", _volume(t), t, TemporalPositionIdentifier=t, SeriesDescription="dyn t1 vibe")
    assert list(_keys(tmp_path)) == [f"{SERIES}#t1", f"{SERIES}#t2", f"{SERIES}#t10"]  # 10 after 2


def test_keys_do_not_depend_on_file_order(tmp_path: Path) -> None:
    write_multi_echo(tmp_path, [_volume(1), _volume(2)], [5.0, 10.0], {"SeriesInstanceUID": SERIES},
                     rng=np.random.default_rng(1))
    headers = scan_folder(tmp_path)[0]
    forward, _ = group_series(headers)
    backward, _ = group_series(headers[::-1])
    assert {k: sorted(h.path for h in v) for k, v in forward.items()} == {
        k: sorted(h.path for h in v) for k, v in backward.items()}


def test_a_series_of_one_volume_keeps_its_plain_uid(tmp_path: Path) -> None:
    _part(tmp_path / "only", _volume(1), 1, EchoTime=20.0)
    assert list(_keys(tmp_path)) == [SERIES]


@pytest.mark.parametrize(("keys", "parts"), [
    ([ImageKey(echo_time=9.0), ImageKey(echo_time=9.0)], ["", ""]),
    ([ImageKey(echo_time=9.0), ImageKey(echo_time=3.0)], ["e2", "e1"]),
    ([ImageKey(b_value=0.0), ImageKey(b_value=1000.0, direction=(1.0, 0.0, 0.0))], ["b0", "b1000"]),
    ([ImageKey(b_value=1000.0, direction=(1.0, 0.0, 0.0)), ImageKey(b_value=1000.0, direction=(0.0, 0.0, 1.0))],
     ["b1000-d2", "b1000-d1"]),
    ([ImageKey(echo_time=5.0, temporal=1), ImageKey(echo_time=9.0, temporal=2)], ["e1-t1", "e2-t2"]),
    ([ImageKey(component="M"), ImageKey(component="P")], ["mag", "phase"]),
    ([ImageKey(component=None), ImageKey(component="FM")], ["mag", "fieldmap"]),
])
def test_volume_parts_table(keys: list[ImageKey], parts: list[str]) -> None:
    assert volume_parts(keys) == parts


def test_mosaic_repeats_are_ordered_by_acquisition() -> None:
    keys = [ImageKey(b_value=0.0)] * 3
    assert volume_parts(keys, mosaics=["c", "a", "b"], orders=[(3, 1, ""), (1, 9, ""), (2, 1, "")]) == [
        "r3", "r1", "r2"]


@pytest.mark.parametrize(("args", "message"), [
    ({"echo_times": [5.0]}, "2 volume\\(s\\) and 1 echo time"),
    ({"echo_times": [5.0, 5.0]}, "distinct and positive"),
    ({"tags": {"EchoTime": 5.0}}, "EchoTime is set per echo"),
    ({"volumes": [_volume(1), Volume(np.zeros((8, 6, 4), np.float32), np.eye(4))]}, "same grid"),
])
def test_write_multi_echo_refuses_bad_arguments(tmp_path: Path, args: dict, message: str) -> None:
    call = {"volumes": [_volume(1), _volume(2)], "echo_times": [5.0, 10.0], "tags": {}, **args}
    with pytest.raises(InputError, match=message):
        write_multi_echo(tmp_path, call["volumes"], call["echo_times"], call["tags"])


def test_enhanced_multi_echo_frames_carry_their_echo_time(tmp_path: Path) -> None:
    (path,) = write_multi_echo(tmp_path, [_volume(1), _volume(2)], [5.0, 10.0], {}, enhanced=True,
                               rng=np.random.default_rng(2))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = ds.PerFrameFunctionalGroupsSequence
    assert ds.NumberOfFrames == 10 and "MREchoSequence" not in ds.SharedFunctionalGroupsSequence[0]
    assert [f.MREchoSequence[0].EffectiveEchoTime for f in frames] == [5.0] * 5 + [10.0] * 5
    assert isinstance(frames[0], Dataset) and frames[5].FrameContentSequence[0].DimensionIndexValues == [1, 2]


def test_ge_private_image_type_tells_magnitude_from_phase(tmp_path: Path) -> None:
    for name, code, seed in (("mag", 0, 1), ("pha", 1, 2)):
        paths = _part(tmp_path / name, _volume(seed), seed, Manufacturer="GE MEDICAL SYSTEMS")
        _set_private(paths, 0x0043, "GEMS_PARM_01", {0x2F: ("SS", code)})
    assert _keys(tmp_path) == {f"{SERIES}#mag": ["mag"] * 5, f"{SERIES}#phase": ["pha"] * 5}


def test_single_valued_image_type_is_one_word_not_letters(tmp_path: Path) -> None:
    (path, *_) = _part(tmp_path, _volume(1), 1, ImageType="ORIGINAL")  # VM 1: pydicom gives a str
    header = read_header(path)
    assert header.image_type == ["ORIGINAL"] and header.image_keys[0][0]["component"] is None  # not "R"
