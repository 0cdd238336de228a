"""A generated federation on disk: real DICOM, aligned masks, joined reports, reproducible."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from fedmri.data.dicom import find_files, load_series
from fedmri.simulations.synth import SiteInfo, generate_federation, generate_site

SEED, N = 7, 6


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteInfo], list[tuple]]:
    out = tmp_path_factory.mktemp("fed")
    calls: list[tuple] = []
    infos = generate_federation(out, sites=3, seed=SEED, preset="tiny", series_per_site=N, workers=2,
                                progress=lambda *a: calls.append(a))
    return out, infos, calls


@pytest.fixture(scope="module")
def volumes(federation: tuple) -> dict[str, dict]:
    """series UID -> (volume, series.csv row, labels.csv row), loaded through the project's reader."""
    out = {}
    for info in federation[1]:
        labels = {r["series_instance_uid"]: r for r in _rows(info.path / "labels.csv")}
        for row in _rows(info.path / "series.csv"):
            uid = row["series_instance_uid"]
            out[uid] = {"site": info, "row": row, "label": labels[uid],
                        "volume": load_series(find_files(info.path / row["dicom_dir"]))}
    return out


def test_layout_counts_and_progress(federation: tuple) -> None:
    out, infos, calls = federation
    assert [i.name for i in infos] == ["site-01", "site-02", "site-03"]
    for info in infos:
        assert info.path == out / info.name and info.n_series == N and not info.reused
        meta = json.loads((info.path / "site.json").read_text())
        assert meta["complete"] and meta["params"]["seed"] == SEED and meta["profile"]["vendor"]
        assert len(_rows(info.path / "labels.csv")) == N
        assert info.n_patients <= info.n_studies <= N
        assert (info.name, N, N) in calls and (info.name, 0, N) in calls


def test_every_file_is_valid_mr_dicom_with_opaque_names(federation: tuple) -> None:
    for info in federation[1]:
        files = find_files(info.path / "dicom")
        assert files
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.Modality == "MR" and ds.file_meta.TransferSyntaxUID
            assert ds.SOPClassUID.name in ("MR Image Storage", "Enhanced MR Image Storage")
            assert ds.PatientSex in ("M", "F") and ds.PatientAge.endswith("Y")
        assert not any(f.stem.isdigit() for f in files)
        # Nested patient/study/series folders, as a PACS export has them.
        assert all(len(f.relative_to(info.path / "dicom").parts) == 4 for f in files)


def test_reader_infers_what_was_generated(volumes: dict) -> None:
    for uid, v in volumes.items():
        meta, row, label = v["volume"].meta, v["row"], v["label"]
        assert meta["series_instance_uid"] == uid
        assert meta["sequence_family"] == row["sequence_family"], (meta["series_description"], row)
        assert meta["body_region"] == row["region"]
        expected_plane = "oblique" if float(row["tilt_deg"]) > 15.0 else row["plane"]
        assert meta["plane"] == expected_plane
        assert meta["patient_sex"] == label["sex"]
        assert abs(meta["patient_age"] - float(label["age"])) < 1.0
        assert "x".join(map(str, v["volume"].shape)) == row["shape"]


def test_body_region_comes_from_the_study_description_where_the_tag_is_empty(federation: tuple) -> None:
    tagged = {}
    for info in federation[1]:
        ds = pydicom.dcmread(find_files(info.path / "dicom")[0], stop_before_pixels=True)
        tagged[info.name] = bool(ds.get("BodyPartExamined"))
    assert list(tagged.values()).count(False) == 1, tagged  # region checks above covered that site too


def test_masks_share_the_series_grid(volumes: dict) -> None:
    n_masks = 0
    for v in volumes.values():
        label = v["label"]
        if not label["mask"]:
            continue
        n_masks += 1
        assert label["findings"], "a mask without a finding"
        mask = nib.load(v["site"].path / label["mask"])
        assert mask.shape == v["volume"].shape
        np.testing.assert_allclose(mask.affine, v["volume"].affine, atol=1e-4)
        assert np.asarray(mask.dataobj).max() > 0
    assert n_masks > 0


def test_simpleitk_reads_the_classic_series(volumes: dict) -> None:
    checked = 0
    for v in volumes.values():
        files = find_files(v["site"].path / v["row"]["dicom_dir"])
        if len(files) < 2:
            continue  # an Enhanced MR multi-frame file
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
        image = reader.Execute()
        assert image.GetSize() == v["volume"].shape
        np.testing.assert_allclose(sitk.GetArrayFromImage(image).T, v["volume"].array, rtol=1e-3, atol=1e-2)
        checked += 1
    assert checked > 0


def test_reports_join_and_identifiers_are_unique_across_sites(federation: tuple, volumes: dict) -> None:
    seen: dict[str, set] = {"patient": set(), "accession": set(), "study": set(), "series": set()}
    for info in federation[1]:
        reports = {r["accession_number"]: r for r in _rows(info.path / "reports.csv")}
        site_ids: dict[str, set] = {k: set() for k in seen}
        for v in (v for v in volumes.values() if v["site"] is info):
            meta = v["volume"].meta
            assert reports[meta["accession_number"]]["study_instance_uid"] == meta["study_instance_uid"]
            for key, value in (("patient", meta["patient_id"]), ("accession", meta["accession_number"]),
                               ("study", meta["study_instance_uid"]), ("series", meta["series_instance_uid"])):
                site_ids[key].add(value)
        assert len(reports) == len(site_ids["study"])
        for key in seen:
            assert not seen[key] & site_ids[key], f"{key} identifiers repeat across sites"
            seen[key] |= site_ids[key]


def test_sites_differ_in_scanner_and_intensities(federation: tuple, volumes: dict) -> None:
    infos = federation[1]
    assert len({i.vendor for i in infos}) == 3 and {i.field_strength for i in infos} == {1.5, 3.0}
    level = {}
    for info in infos:
        p99 = [np.percentile(v["volume"].array, 99) for v in volumes.values()
               if v["site"] is info and v["row"]["sequence_family"] != "ADC"]
        level[info.name] = float(np.median(p99))
    assert max(level.values()) > 2.0 * min(level.values()), level


def _arrays(site: Path) -> dict[str, np.ndarray]:
    return {r["series_instance_uid"]: load_series(find_files(site / r["dicom_dir"])).array
            for r in _rows(site / "series.csv")}


def test_same_seed_same_files_other_seed_other_files(federation: tuple, tmp_path: Path) -> None:
    first = federation[1][0].path  # written by a worker process
    again = generate_site(tmp_path / "again", site_index=1, seed=SEED, preset="tiny", series_per_site=N)
    for name in ("reports.csv", "labels.csv", "series.csv"):
        assert (again.path / name).read_bytes() == (first / name).read_bytes(), name
    a, b = _arrays(first), _arrays(again.path)
    assert a.keys() == b.keys()
    for uid in a:
        np.testing.assert_array_equal(a[uid], b[uid])
    other = generate_site(tmp_path / "other", site_index=1, seed=SEED + 1, preset="tiny", series_per_site=N)
    assert (other.path / "labels.csv").read_bytes() != (first / "labels.csv").read_bytes()
    c = _arrays(other.path)
    assert not set(c) & set(a)
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x in c.values() for y in a.values())
