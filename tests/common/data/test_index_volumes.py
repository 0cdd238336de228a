"""`index_site` on a PACS-like export: split volumes get their own catalog rows, the rest is listed."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import nibabel
import numpy as np
import pytest

from fedmri.config import load_config
from fedmri.data import Volume
from fedmri.data.catalog_db import open_catalog, series_rows
from fedmri.data.dicom import DicomHeader, group_series, read_header
from fedmri.data.indexer import index_site
from fedmri.simulations.dicom_writer import write_multi_echo, write_series

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
DWI = "1.3.12.2.1107.5.2.32.35119.2010011420292594820699190.0.0.0"
# What DicomHeader held before volumes were split.
OLD_FIELDS = ("path", "size", "mtime_ns", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
              "accession_number", "patient_id", "modality", "transfer_syntax_uid", "number_of_frames")
CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DWI mosaics, a dual-echo series, a localizer; one patient, one study."""
    root = tmp_path_factory.mktemp("export")
    for b in ("0", "1000"):
        (root / f"MR{b}").write_bytes(gzip.decompress((NIBABEL_DATA / f"siemens_dwi_{b}.dcm.gz").read_bytes()))
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    echoes = [Volume(rng.integers(0, 900, (10, 8, 6)).astype(np.float32), affine) for _ in range(2)]
    tags = {"PatientID": "P1", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1",
            "SeriesDescription": "pd_t2_tse_dual"}
    write_multi_echo(root / "dual", echoes, [12.0, 96.0], tags, rng=rng)
    write_series(root / "scout", Volume(rng.integers(0, 900, (10, 8, 3)).astype(np.float32), affine),
                 {**tags, "SeriesInstanceUID": "1.2.3.2", "SeriesDescription": "localizer"}, rng=rng)
    (root.parent / f"{root.name}-reports.csv").write_text("accession_number,study_instance_uid,findings,impression\n")
    return root


def test_split_volumes_are_catalog_rows_and_the_localizer_is_listed(export: Path, tmp_path: Path) -> None:
    reports = export.parent / f"{export.name}-reports.csv"
    result = index_site(export, reports, tmp_path / "cat", cfg=CFG)
    conn = open_catalog(tmp_path / "cat")
    rows = {r["series_uid"]: r for r in series_rows(conn)}
    conn.close()
    assert sorted(rows) == ["1.2.3.1#e1", "1.2.3.1#e2", f"{DWI}#b0", f"{DWI}#b1000"]
    assert len({r["id"] for r in rows.values()}) == 4  # distinct pseudonymous ids
    meta = {key: r["meta"] for key, r in rows.items()}  # series_rows decodes the JSON columns
    assert [meta[f"{DWI}#b{b}"]["b_value"] for b in ("0", "1000")] == [0.0, 1000.0]
    assert [rows[f"{DWI}#b{b}"]["sequence"] for b in ("0", "1000")] == ["DWI", "DWI"]
    assert [meta[f"1.2.3.1#e{e}"]["echo_time"] for e in (1, 2)] == [12.0, 96.0]
    assert rows[f"{DWI}#b1000"]["shape"] == [128, 128, 48]
    (skip,) = result.skipped
    assert skip.path == str(export / "scout") and skip.reason.startswith("localizer/scout (description 'localizer')")

    again = index_site(export, reports, tmp_path / "cat", cfg=CFG)  # keys are stable: nothing is read again
    assert (again.n_loaded, again.n_series) == (0, 4)


def test_headers_of_an_older_catalog_are_read_again(export: Path) -> None:
    """A catalog written before volumes were split stored headers without their keys."""
    old = {k: v for k, v in dataclasses.asdict(read_header(export / "MR1000")).items() if k in OLD_FIELDS}
    volumes, skipped = group_series([DicomHeader(**old), read_header(export / "MR0")])
    assert skipped == [] and sorted(volumes) == [f"{DWI}#b0", f"{DWI}#b1000"]


def test_a_labels_row_names_the_series_and_reaches_every_volume_of_it(export: Path, tmp_path: Path) -> None:
    reports = export.parent / f"{export.name}-reports.csv"
    labels = tmp_path / "labels.csv"
    labels.write_text(f"series_instance_uid,findings,age,sex,mask\n{DWI},infarct,71,F,\n1.2.3.1,,40,M,\n")
    result = index_site(export, reports, tmp_path / "cat", labels=labels, cfg=CFG)
    conn = open_catalog(tmp_path / "cat")
    rows = {r["series_uid"]: r for r in series_rows(conn)}
    conn.close()
    assert [rows[f"{DWI}#b{b}"]["label_findings"] for b in ("0", "1000")] == [["infarct"], ["infarct"]]
    assert [rows[f"1.2.3.1#e{e}"]["label_findings"] for e in (1, 2)] == [[], []]
    assert not [s for s in result.skipped if str(labels) in s.path]  # both rows matched a series
