"""`index_site` on real DICOM files: acceptance, incremental re-index, atomic interruption."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from helpers.site_factory import add_bad_inputs, make_site

from fedmri.config import load_config
from fedmri.data.catalog_db import SPLITS, open_catalog, series_rows, skipped_rows
from fedmri.data.indexer import index_site
from fedmri.data.preprocess import Preprocessor

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])


def _dump(catalog: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted: two equal dumps are the same catalog."""
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    dump = {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}
    conn.close()
    return dump


def _cache_mtimes(catalog: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (catalog / "cache").rglob("*.npz")}


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory: pytest.TempPathFactory):
    site = make_site(tmp_path_factory.mktemp("bad") / "site")
    return site, add_bad_inputs(site)


@pytest.fixture()
def site(tmp_path: Path):
    return make_site(tmp_path / "site", n_patients=3, series_per_patient=2, seed=1)


def test_acceptance_mixed_folder(bad_site, tmp_path: Path) -> None:
    site, bad = bad_site
    # MR_truncated is a single slice: with data.index.min_slices at its default it would be listed as too
    # thin before its pixels are read; at 1 the indexer must report the truncation itself.
    cfg = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]", "data.index.min_slices=1"])
    result = index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, cfg=cfg)
    assert result.exit_code == 3
    assert result.n_series == len(site.series_uids) == 6
    reasons = {s.path: s.reason for s in result.skipped}
    assert "truncated" in reasons[bad["truncated"]].lower() or "decode" in reasons[bad["truncated"]]
    assert "CT" in reasons[bad["ct"]]
    assert "not a DICOM" in reasons[bad["text"]]
    assert "missing" in reasons[bad["gap"]] and "1.2.826.0.9.1" in reasons[bad["gap"]]
    assert sum("duplicate" in r for r in reasons.values()) == 1
    assert "matches no indexed series" in reasons[f"{site.reports}:5"]
    assert "UTF-8" in reasons[f"{site.reports}:6"]
    assert "9.9.9.9" in reasons[f"{site.labels}:8"]
    assert "tumour" in reasons[f"{site.labels}:9"] and "'abc'" in reasons[f"{site.labels}:9"]
    assert len(result.skipped) == 9
    conn = open_catalog(tmp_path / "cat")
    assert [(s.path, s.reason) for s in skipped_rows(conn)] == [(s.path, s.reason) for s in result.skipped]
    rows = series_rows(conn)
    conn.close()
    assert sorted(r["series_uid"] for r in rows) == sorted(site.series_uids)
    for row in rows:
        assert row["report_findings"].startswith("Findings of patient") and row["report_impression"]
        assert row["split"] in SPLITS and row["sequence"] in ("T1", "T2", "FLAIR")
        assert row["body_region"] == "brain" and row["shape"] == [24, 20, 6]
        assert row["label_findings"] is not None and row["age"] is not None and row["sex"] in ("M", "F")
        assert (tmp_path / "cat" / row["cache_path"]).is_file() and len(row["source_paths"]) == 6
        assert "PAT" not in row["id"] + row["patient_id"] and "PatientID" not in json.dumps(row["meta"])
    assert [bool(r["has_mask"]) for r in rows].count(True) == 1


def test_patients_are_pseudonymous_and_in_one_split(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", n_patients=12, series_per_patient=2, seed=3, with_mask=False)
    index_site(site.dicom, site.reports, tmp_path / "cat", cfg=CFG)
    conn = open_catalog(tmp_path / "cat")
    rows = series_rows(conn)
    conn.close()
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(row["split"])
    assert len(by_patient) == 12 and all(len(s) == 1 for s in by_patient.values())
    # Same PatientID -> same pseudonym; different -> different.
    uid_to_pid = {r["series_uid"]: r["patient_id"] for r in rows}
    for a in site.series_uids:
        for b in site.series_uids:
            assert (uid_to_pid[a] == uid_to_pid[b]) == (site.patients[a] == site.patients[b])


def test_reindex_unchanged_does_no_work(bad_site, tmp_path: Path) -> None:
    site, _ = bad_site
    first = index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, cfg=CFG)
    before, mtimes = _dump(tmp_path / "cat"), _cache_mtimes(tmp_path / "cat")
    again = index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, cfg=CFG)
    assert (again.n_headers_read, again.n_loaded, again.n_preprocessed) == (0, 0, 0)
    assert first.n_headers_read == again.n_files > 0 and first.n_preprocessed == 6
    after = _dump(tmp_path / "cat")
    assert after["series"] == before["series"] and after["files"] == before["files"]
    assert after["skipped"] != [] and [r[:2] for r in after["skipped"]] == [r[:2] for r in before["skipped"]]
    assert _cache_mtimes(tmp_path / "cat") == mtimes


def test_incremental_add_change_remove(site, tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    extra = make_site(tmp_path / "extra", n_patients=1, series_per_patient=1, seed=7, with_mask=False)
    shutil.copytree(extra.dicom, site.dicom / "new")
    touched = sorted(site.series_dirs[1].iterdir())[0]
    touched.write_bytes(touched.read_bytes())  # same content, new mtime
    shutil.rmtree(site.series_dirs[2])
    result = index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    assert result.n_loaded == 2 and result.n_preprocessed == 1  # new series; touched one hits the cache
    assert result.n_headers_read == 6 + 1
    conn = open_catalog(cat)
    uids = {r["series_uid"] for r in series_rows(conn)}
    conn.close()
    assert uids == (set(site.series_uids) - {site.series_uids[2]}) | set(extra.series_uids)
    assert any(site.series_uids[2] in s.reason for s in result.skipped)  # its labels now match nothing


def test_changed_settings_reprocess_and_labels_update_without_reading(site, tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    text = site.labels.read_text().replace("40.5", "41.25")
    site.labels.write_text(text)
    result = index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    assert result.n_loaded == 0
    conn = open_catalog(cat)
    assert 41.25 in {r["age"] for r in series_rows(conn)}
    conn.close()
    other = load_config("tiny", overrides=["data.preprocess.target_shape=[8,8,8]"])
    result = index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=other)
    assert result.n_loaded == result.n_preprocessed == 6


def test_interrupted_index_changes_nothing_and_rerun_completes(site, tmp_path: Path, monkeypatch) -> None:
    cat = tmp_path / "cat"
    index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    extra = make_site(tmp_path / "extra", n_patients=2, series_per_patient=2, seed=8, with_mask=False)
    shutil.copytree(extra.dicom, site.dicom / "new")
    before = _dump(cat)
    real_call, calls = Preprocessor.__call__, []

    def interrupting(self, volume, mask=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, volume, mask)

    monkeypatch.setattr(Preprocessor, "__call__", interrupting)
    with pytest.raises(KeyboardInterrupt):
        index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    assert _dump(cat) == before
    monkeypatch.setattr(Preprocessor, "__call__", real_call)
    result = index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    assert result.n_loaded == 4 and result.n_preprocessed == 2  # the two written before the interrupt are reused
    assert result.n_series == 10


def test_synthetic_site_indexes_cleanly_with_patient_level_split(tmp_path: Path) -> None:
    from fedmri.simulations.synth import generate_site

    info = generate_site(tmp_path / "site-01", site_index=1, seed=0, series_per_site=8)
    site = info.path
    cfg = load_config("tiny", overrides=["data.catalog.split_fractions=[0.34,0.33,0.33]"])
    result = index_site(site / "dicom", site / "reports.csv", tmp_path / "cat", labels=site / "labels.csv", cfg=cfg)
    assert result.exit_code == 0, result.skipped
    assert result.n_series == 8
    conn = open_catalog(tmp_path / "cat")
    rows = series_rows(conn)
    conn.close()
    truth = {r["series_instance_uid"]: r for r in csv.DictReader(open(site / "series.csv", encoding="utf-8"))}
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(row["split"])
        assert row["report_impression"] and row["label_findings"] is not None
        assert row["sequence"] == truth[row["series_uid"]]["sequence_family"]
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert len(by_patient) == len({t["patient_id"] for t in truth.values()})


def test_nifti_series_are_indexed_beside_dicom(site, tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    nifti = tmp_path / "nifti"
    (nifti / "sub-01").mkdir(parents=True)
    array = np.random.default_rng(0).uniform(0, 100, (20, 22, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), nifti / "sub-01" / "sub-01_T2w.nii.gz")
    (nifti / "readme.txt").write_text("scans\n")
    with open(site.labels, "a", encoding="utf-8") as fh:
        fh.write("sub-01/sub-01_T2w,wmh,30,F,\n")
    result = index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, nifti=nifti, cfg=CFG)
    assert result.n_series == 7
    assert [s.path for s in result.skipped] == [str(nifti / "readme.txt")]
    conn = open_catalog(tmp_path / "cat")
    row = next(r for r in series_rows(conn) if r["source_kind"] == "nifti")
    conn.close()
    assert row["series_uid"] == "sub-01/sub-01_T2w" and row["sequence"] == "T2"
    assert row["label_findings"] == ["wmh"] and row["age"] == 30.0 and row["shape"] == [20, 22, 10]
    again = index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, nifti=nifti, cfg=CFG)
    assert again.n_loaded == 0 and again.n_series == 7
