"""`fedmri data audit`: identifiers stay at rest in the catalog; what is shown or sent carries none."""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers.site_factory import add_bad_inputs, make_site

from fedmri.cli import main
from fedmri.config import load_config
from fedmri.data.audit import COLUMNS, audit_catalog
from fedmri.data.catalog_db import SALT_FILE, load_or_create_salt, pseudonym
from fedmri.data.dataset import SeriesDataset
from fedmri.data.indexer import index_site
from fedmri.protocol import search_reply

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    site = make_site(root / "site", n_patients=2, series_per_patient=2, seed=31)
    add_bad_inputs(site)  # skipped inputs and a failed series: their paths and UIDs are at rest too
    result = index_site(site.dicom, site.reports, root / "cat", labels=site.labels, cfg=CFG)
    assert result.n_series == 4 and result.skipped
    return root / "cat"


@pytest.fixture()
def copy(catalog: Path, tmp_path: Path) -> Path:
    shutil.copytree(catalog, tmp_path / "cat")
    return tmp_path / "cat"


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedmri", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out + out.err


def _raw_identifiers(catalog: Path) -> set[str]:
    """UIDs, accession numbers, paths and report text of the catalog, read here without the audit's help."""
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    values = set()
    for uid, study, accession, paths, findings in conn.execute(
            "SELECT series_uid, study_uid, accession, source_paths, report_findings FROM series"):
        values |= {uid, study, accession, findings, *json.loads(paths)}
    for (header,) in conn.execute("SELECT header FROM files WHERE header IS NOT NULL"):
        h = json.loads(header)
        values |= {h["patient_id"], h["sop_instance_uid"], h["path"]}
    conn.close()
    return {v for v in values if v}


def test_clean_catalog_lists_identifier_columns_and_passes(catalog: Path, monkeypatch, capsys) -> None:
    report = audit_catalog(catalog)
    assert report.findings == [] and report.exit_code == 0
    holds = {(c.table, c.column): (c.holds, c.n_values) for c in report.columns}
    assert holds[("series", "accession")] == ("identifier", 4)
    assert holds[("series", "source_paths")] == ("identifier", 4)
    assert holds[("series", "report_findings")][0] == "identifier"
    assert holds[("files", "header")][0] == "identifier" and holds[("skipped", "path")][1] > 0
    assert holds[("series", "id")] == ("pseudonym", 4) and holds[("series", "vendor")][0] == "none"
    assert len(holds) == sum(map(len, COLUMNS.values()))  # every column of the schema is classified
    assert report.checked["data show / --json"] > 0 and report.checked["sent to the coordinator"] > 0

    code, out = cli(monkeypatch, capsys, "data", "audit", str(catalog))
    assert code == 0, out
    assert "series.accession" in out and "files.header" in out and "clean" in out and "Traceback" not in out


def test_show_json_and_search_ids_carry_no_raw_identifier(catalog: Path, monkeypatch, capsys) -> None:
    """The audit's claim, checked independently: raw values are absent, ids are the salted HMACs."""
    raw = _raw_identifiers(catalog)
    code, out = cli(monkeypatch, capsys, "data", "show", str(catalog), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["skipped"]  # the admin's list of files to fix: site only, by design
    shown = json.dumps({k: v for k, v in doc.items() if k != "skipped"})
    assert not [v for v in raw if v in shown]
    code, text = cli(monkeypatch, capsys, "data", "show", str(catalog))
    counts = text.split("Skipped inputs")[0]
    assert code == 0 and not [v for v in raw if v in counts]

    salt = load_or_create_salt(catalog)
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    expected = sorted(pseudonym(salt, "series", uid) for (uid,) in conn.execute("SELECT series_uid FROM series"))
    conn.close()
    metas = [row["meta"] for row in SeriesDataset(catalog, None).rows]
    reply = search_reply([m["series_id"] for m in metas], [0.5] * len(metas))
    assert sorted(reply["ids"]) == expected
    assert not [v for v in raw if v in json.dumps(metas)]


@pytest.mark.parametrize(("tamper", "where", "problem"), [
    ("UPDATE series SET vendor = accession", "data show --json: series[", "series.accession"),
    ("UPDATE series SET sequence = 'T2 of ' || series_uid", "sequence", "series.series_uid"),
    ("UPDATE series SET body_region = json_extract(source_paths, '$[0]')", "body_region", "series.source_paths"),
    ("UPDATE series SET id = series_uid", "catalog series[0].id", "not the salted pseudonym"),
    ("UPDATE series SET patient_id = 'PAT31000'", "patient_id", "not a pseudonym"),
    ("ALTER TABLE series ADD COLUMN patient_name TEXT", "series.patient_name", "not classified"),
])
def test_a_leak_is_found_and_named(copy: Path, tamper: str, where: str, problem: str, monkeypatch, capsys) -> None:
    conn = sqlite3.connect(copy / "catalog.sqlite")
    conn.execute(tamper)
    conn.commit()
    conn.close()
    report = audit_catalog(copy)
    assert report.exit_code == 1
    assert any(where in f.where and problem in f.problem for f in report.findings), report.findings

    code, out = cli(monkeypatch, capsys, "data", "audit", str(copy))
    assert code == 1 and "Findings" in out and "Traceback" not in out
    assert "PAT31000" not in out  # the offending field is named, its value never printed


def test_another_salt_is_found_and_a_missing_catalog_is_exit_2(copy: Path, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    (copy / SALT_FILE).write_text(secrets.token_hex(32) + "\n")
    report = audit_catalog(copy)
    assert sum("not the salted pseudonym" in f.problem for f in report.findings) == 8  # 4 series + 4 studies
    code, out = cli(monkeypatch, capsys, "data", "audit", str(tmp_path / "nothing"))
    assert code == 2 and "no catalog" in out
