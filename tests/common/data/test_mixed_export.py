"""Acceptance: one folder holding everything a PACS export may hold, indexed by `fedmri data index`.

Every file ends up in the catalog (a series' source file, or a mask) or in the
skipped list with its reason; the command exits 3 (done, with skips) and never
shows a traceback.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from fedmri.cli import main
from fedmri.data.catalog_db import open_catalog, series_rows, skipped_rows
from fedmri.data.geometry import slice_normal
from fedmri.data.volume import Volume
from fedmri.simulations.dicom_writer import write_multi_echo, write_series

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
DWI = "1.3.12.2.1107.5.2.32.35119.2010011420292594820699190.0.0.0"
SHAPE = (20, 16, 6)
AXIAL = np.array([[-1.2, 0, 0, 20.0], [0, -1.1, 0, 15.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])


def _volume(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> Volume:
    return Volume(rng.integers(50, 900, shape).astype(np.float32), AXIAL)


def _tags(uid: str, description: str, **more: object) -> dict[str, object]:
    return {"PatientID": "PMIX", "StudyInstanceUID": "1.2.826.0.5", "AccessionNumber": "AMIX",
            "SeriesInstanceUID": uid, "SeriesDescription": description, "BodyPartExamined": "BRAIN", **more}


def _seg(paths: list[Path], volume: Volume, out: Path) -> None:
    """A one-segment DICOM SEG drawn on the series ``paths`` (highdicom)."""
    sources = [dcmread(p) for p in paths]
    normal = slice_normal([float(v) for v in sources[0].ImageOrientationPatient])
    sources.sort(key=lambda ds: np.dot([float(v) for v in ds.ImagePositionPatient], normal))
    labels = (volume.array > 800).astype(np.uint8)  # I, J, K
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.moveaxis(labels, (0, 1, 2), (2, 1, 0)), segmentation_type="BINARY",
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="lesion", algorithm_type="MANUAL",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion)],
        series_instance_uid=hd.UID(), series_number=90, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedmri-tests", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PACS export: one folder per series, as most exports are, plus junk."""
    root = tmp_path_factory.mktemp("mixed") / "export"
    rng = np.random.default_rng(7)
    (root / "mosaic").mkdir(parents=True)
    for b in ("0", "1000"):  # Siemens DWI mosaics: one series, two volumes
        (root / "mosaic" / f"MR{b}").write_bytes(gzip.decompress((NIBABEL_DATA / f"siemens_dwi_{b}.dcm.gz")
                                                                  .read_bytes()))
    (root / "philips").mkdir()
    (root / "philips" / "IM_0001").write_bytes(gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes()))
    write_series(root / "mip", _volume(rng), _tags("1.2.826.0.5.1", "t1_fl3d_tra_MIP", ImageType=[
        "DERIVED", "SECONDARY", "PROJECTION IMAGE", "MIP"]), rng=rng)
    write_series(root / "scout", _volume(rng), _tags("1.2.826.0.5.2", "AAHead_Scout", ImageType=[
        "ORIGINAL", "PRIMARY", "LOCALIZER"]), rng=rng)
    write_multi_echo(root / "echoes", [_volume(rng), _volume(rng)], [12.0, 96.0],
                     _tags("1.2.826.0.5.3", "pd_t2_tse_dual"), rng=rng)
    write_series(root / "mono1", _volume(rng), _tags("1.2.826.0.5.4", "t2_tse_tra"), rng=rng, monochrome1=True)
    t1 = _volume(rng)
    t1_paths = write_series(root / "t1", t1, _tags("1.2.826.0.5.5", "t1_se_tra"), rng=rng)
    _seg(t1_paths, t1, root / "seg" / "lesion.dcm")
    cut = write_series(root / "cut", _volume(rng), _tags("1.2.826.0.5.6", "flair_tra"), rng=rng)
    cut[3].write_bytes(cut[3].read_bytes()[:-200])  # an export interrupted mid-file
    junk = root / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("export log\n")
    (junk / "empty").write_bytes(b"")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), junk / "truncated.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), junk / "ct.dcm")
    (root.parent / "reports.csv").write_text("accession_number,study_instance_uid,findings,impression\n"
                                             "AMIX,1.2.826.0.5,Small lesion.,Lesion.\n")
    return root


def test_every_file_is_catalogued_or_listed_and_the_index_exits_3(export: Path, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    cat = tmp_path / "cat"
    monkeypatch.setattr(sys, "argv", ["fedmri", "data", "index", str(export), "--reports",
                                      str(export.parent / "reports.csv"), "--out", str(cat),
                                      "data.preprocess.target_shape=[16,16,8]"])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    assert exc.value.code == 3, out + err
    assert "Traceback" not in err and "Traceback" not in out

    conn = open_catalog(cat)
    rows = {r["series_uid"]: r for r in series_rows(conn)}
    skipped = {s.path: s.reason for s in skipped_rows(conn)}
    conn.close()
    philips = next(uid for uid, r in rows.items() if r["vendor"] == "Philips")
    assert sorted(rows) == sorted([f"{DWI}#b0", f"{DWI}#b1000", philips, "1.2.826.0.5.3#e1", "1.2.826.0.5.3#e2",
                                   "1.2.826.0.5.4", "1.2.826.0.5.5"])
    assert rows["1.2.826.0.5.5"]["has_mask"] and rows["1.2.826.0.5.5"]["mask_source"] == str(export / "seg" /
                                                                                              "lesion.dcm")
    assert all(r["report_findings"] == "Small lesion." for uid, r in rows.items() if uid.startswith("1.2.826.0.5"))
    reasons = {Path(path).relative_to(export).as_posix(): reason for path, reason in skipped.items()}
    assert sorted(reasons) == ["cut", "junk/ct.dcm", "junk/empty", "junk/notes.txt", "junk/truncated.dcm", "mip",
                               "scout"]
    assert "reformat, projection" in reasons["mip"] and reasons["scout"].startswith("localizer/scout")
    assert "CT" in reasons["junk/ct.dcm"] and "not a DICOM" in reasons["junk/notes.txt"]
    assert "empty" in reasons["junk/empty"] and "too thin" in reasons["junk/truncated.dcm"]
    assert "cannot decode pixel data" in reasons["cut"] and "1.2.826.0.5.6" in reasons["cut"]

    # Coverage: each file is a source of a catalog row, its mask, a skipped file, or in a skipped series' folder.
    used = {p for r in rows.values() for p in r["source_paths"]} | {r["mask_source"] for r in rows.values()}
    folders = [p for p in skipped if Path(p).is_dir()]
    assert all(Path(p).parent == export for p in folders)  # a series' own folder, never the whole export
    files = sorted(str(p) for p in export.rglob("*") if p.is_file())
    uncovered = [f for f in files if f not in used and f not in skipped and str(Path(f).parent) not in folders]
    assert uncovered == [] and len(files) == 50
    assert not (used & set(skipped))  # nothing both used and skipped

    monkeypatch.setattr(sys, "argv", ["fedmri", "data", "show", str(cat), "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert not exc.value.code
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_series"] == 7 and doc["coverage"]["masks"] == 1 and len(doc["skipped"]) == 7
