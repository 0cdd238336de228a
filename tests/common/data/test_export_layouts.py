"""PACS exports as they arrive: flat, nested, or a DICOMDIR file-set (a CD, a copied CD, pydicom's own)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from fedmri.config import load_config
from fedmri.data.catalog_db import open_catalog, series_rows
from fedmri.data.dicomdir import read_dicomdir, select_listed
from fedmri.data.indexer import index_site
from fedmri.data.volume import Volume
from fedmri.simulations.dicom_writer import write_series

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])
UIDS = ("1.2.826.0.8.1", "1.2.826.0.8.2")


def _export(folder: Path) -> list[list[Path]]:
    """Two series of one study, with the study tags a DICOMDIR record needs; files per series."""
    rng = np.random.default_rng(3)
    written = []
    for n, uid in enumerate(UIDS):
        array = np.round(rng.uniform(50, 900, (16, 14, 8))).astype(np.float32)
        written.append(write_series(folder / f"series{n}", Volume(array, np.diag([-1.2, -1.1, 3.0, 1.0])), {
            "PatientID": "PEXP", "PatientName": "Doe^Jane", "StudyInstanceUID": "1.2.826.0.8", "StudyID": "7",
            "SeriesInstanceUID": uid, "StudyDate": "20240101", "StudyTime": "120000", "AccessionNumber": "AEXP",
            "SeriesNumber": n + 1, "SeriesDescription": "t2_tse_tra", "BodyPartExamined": "BRAIN"}, rng=rng))
    return written


def _reports(tmp_path: Path) -> Path:
    path = tmp_path / "reports.csv"
    path.write_text("accession_number,study_instance_uid,findings,impression\nAEXP,,Normal.,Normal.\n")
    return path


def _uids(catalog: Path) -> list[str]:
    conn = open_catalog(catalog)
    uids = sorted(r["series_uid"] for r in series_rows(conn))
    conn.close()
    return uids


@pytest.fixture(scope="module")
def cd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CD as a PACS burns it: DICOMDIR plus PT000000/ST000000/SE00000n/IM00000n, written by pydicom."""
    root = tmp_path_factory.mktemp("cd")
    file_set = FileSet()
    for path in sorted(p for files in _export(root / "export") for p in files):
        file_set.add(path)
    file_set.write(root / "cd")
    return root / "cd"


def test_flat_and_nested_exports_give_the_same_series(tmp_path: Path) -> None:
    files = _export(tmp_path / "nested")
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(sorted(p for group in files for p in group)):  # both series mixed, names meaningless
        shutil.copy(path, flat / f"IMG{n:05d}")
    split = tmp_path / "split"  # one series spread over two folders (an export cut at a file-count limit)
    for n, path in enumerate(files[0]):
        (split / f"part{n % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, split / f"part{n % 2}" / path.name)
    for folder in (tmp_path / "nested", flat, split):
        result = index_site(folder, _reports(tmp_path), tmp_path / f"cat-{folder.name}", cfg=CFG)
        assert result.exit_code == 0, result.skipped
    assert _uids(tmp_path / "cat-nested") == _uids(tmp_path / "cat-flat") == list(UIDS)
    assert _uids(tmp_path / "cat-split") == [UIDS[0]]


def test_dicomdir_folder_or_file_indexes_the_file_set(cd: Path, tmp_path: Path) -> None:
    listed = read_dicomdir(cd / "DICOMDIR")
    assert len(listed) == 16 and all(name.startswith("PT000000/ST000000/SE00000") for name in listed)
    copy = tmp_path / "cd"
    shutil.copytree(cd, copy)
    (copy / "VIEWER.EXE").write_bytes(b"MZ not an image")
    (copy / "AUTORUN.INF").write_text("[autorun]\n")
    second = [copy / name for name in listed if "/SE000001/" in name]
    missing = max(second, key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    missing.unlink()  # the top slice of the second series: the series is still whole enough to read
    result = index_site(copy, _reports(tmp_path), tmp_path / "cat", cfg=CFG)
    reasons = {s.path: s.reason for s in result.skipped}
    assert set(reasons) == {str(copy / "VIEWER.EXE"), str(copy / "AUTORUN.INF"), str(missing)}
    assert all("not listed in" in reasons[str(copy / name)] for name in ("VIEWER.EXE", "AUTORUN.INF"))
    assert "listed in" in reasons[str(missing)] and "missing" in reasons[str(missing)]
    assert _uids(tmp_path / "cat") == list(UIDS) and result.n_files == 15 + 1 + 2  # images, DICOMDIR, extras
    by_file = index_site(copy / "DICOMDIR", _reports(tmp_path), tmp_path / "cat2", cfg=CFG)
    assert sorted((s.path, s.reason) for s in by_file.skipped) == sorted((s.path, s.reason) for s in result.skipped)
    again = index_site(copy, _reports(tmp_path), tmp_path / "cat", cfg=CFG)
    assert (again.n_headers_read, again.n_loaded) == (0, 0)


def test_dicomdir_names_match_a_copy_with_other_case(cd: Path, tmp_path: Path) -> None:
    lower = tmp_path / "copied"
    for path in sorted(p for p in cd.rglob("*") if p.is_file()):
        relative = path.relative_to(cd)
        target = lower / (relative if path.name == "DICOMDIR" else Path(*(p.lower() for p in relative.parts)))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    result = index_site(lower, _reports(tmp_path), tmp_path / "cat", cfg=CFG)
    assert result.exit_code == 0, result.skipped
    assert _uids(tmp_path / "cat") == list(UIDS)


def test_select_listed_keeps_what_a_dicomdir_lists(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = [root / "loose.dcm", root / "cd" / "DICOMDIR", root / "cd" / "img" / "im1", root / "cd" / "readme.txt",
             root / "cd" / "inner" / "DICOMDIR", root / "cd" / "inner" / "x"]
    to_read, unlisted, missing = select_listed(files, {root / "cd" / "DICOMDIR": ["IMG/IM1;1", "IMG/IM2"],
                                                       root / "cd" / "inner" / "DICOMDIR": ["X"]})
    assert to_read == [root / "loose.dcm", root / "cd" / "img" / "im1", root / "cd" / "inner" / "x"]
    assert [s.path for s in unlisted] == [str(root / "cd" / "readme.txt")]
    assert [s.path for s in missing] == [str(root / "cd" / "IMG/IM2")]


def test_pydicoms_dicomdir_is_followed(tmp_path: Path) -> None:
    source = Path(get_testdata_file("DICOMDIR")).parent
    copy = tmp_path / "dicomdirtests"
    copy.mkdir()
    shutil.copy(source / "DICOMDIR", copy / "DICOMDIR")
    for folder in ("77654033", "98892001", "98892003"):
        shutil.copytree(source / folder, copy / folder)
    shutil.copy(source / "README.txt", copy / "README.txt")
    listed = read_dicomdir(copy / "DICOMDIR")
    result = index_site(copy, _reports(tmp_path), tmp_path / "cat", cfg=CFG)
    reasons = {s.path: s.reason for s in result.skipped}
    assert str(copy / "DICOMDIR") not in reasons  # the index is used, not skipped as "not an image"
    assert "not listed in" in reasons[str(copy / "README.txt")]
    assert result.n_files == len(listed) + 2 and len(listed) == 31
    # The CR and CT images it lists are read and refused for their modality, not for the DICOMDIR.
    for name in listed:
        if name.split("/")[1].startswith(("CR", "CT")):
            assert "not MR" in reasons[str(copy / name)]
    conn = open_catalog(tmp_path / "cat")
    indexed = {path for row in series_rows(conn) for path in row["source_paths"]}
    conn.close()
    mr = {str(copy / name) for name in listed if name.split("/")[1].startswith("MR")}
    # Every MR file it lists is in the catalog, or its series (the file or its folder) is skipped for a
    # reason of its own, never for the DICOMDIR.
    for path in mr - indexed:
        reason = reasons.get(path) or reasons[str(Path(path).parent)]
        assert "listed in" not in reason
