"""`fedmri data index` / `show` / `synth` as a user types them: exit codes, tables, JSON."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers.site_factory import add_bad_inputs, make_site

from fedmri.cli import main

SMALL = "data.preprocess.target_shape=[16,16,8]"


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `fedmri ARGS` in this process (the real entry point, with its error handling)."""
    monkeypatch.setattr(sys, "argv", ["fedmri", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out.out, out.err


def _dump(catalog: Path) -> list:
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    rows = [list(conn.execute(f"SELECT * FROM {t}")) for t in ("files", "series", "skipped", "runs")]
    conn.close()
    return rows


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli")
    good = make_site(root / "good", n_patients=2, series_per_patient=2, seed=11)
    bad = make_site(root / "bad", n_patients=2, series_per_patient=2, seed=12)
    add_bad_inputs(bad)
    return good, bad


def test_index_clean_site_exits_0_then_show(sites, tmp_path: Path, monkeypatch, capsys) -> None:
    good, _ = sites
    cat = tmp_path / "cat"
    code, out, err = run(monkeypatch, capsys, "data", "index", str(good.dicom), "--reports", str(good.reports),
                         "--labels", str(good.labels), "--out", str(cat), SMALL)
    assert code == 0, err
    assert "series in catalog" in out and "Skipped" not in out
    # Progress goes to stderr; captured (not a terminal, as under nohup), as lines with the counts.
    assert "files scanned: 0/" in err and "series processed: 4/4" in err, err

    code, out, err = run(monkeypatch, capsys, "data", "show", str(cat))
    assert code == 0, err
    for word in ("Sequence", "Body region", "Vendor", "Split", "Label coverage", "brain", "Siemens"):
        assert word in out

    code, out, _ = run(monkeypatch, capsys, "data", "show", str(cat), "--json")
    doc = json.loads(out)
    assert doc["n_series"] == 4 and len(doc["series"]) == 4 and doc["skipped"] == []
    assert sum(doc["by_split"].values()) == 4 and doc["coverage"]["reports"] == 4 and doc["coverage"]["masks"] == 1
    entry = doc["series"][0]
    assert set(entry) == {"id", "shape", "spacing", "sequence", "body_region", "vendor", "split"}
    assert entry["shape"] == [24, 20, 6] and entry["spacing"] == pytest.approx([1.2, 1.1, 3.0])
    assert good.series_uids[0] not in out and "PAT" not in out  # only pseudonyms leave the catalog


def test_index_bad_inputs_exits_3_and_lists_them(sites, tmp_path: Path, monkeypatch, capsys) -> None:
    _, bad = sites
    args = ("data", "index", str(bad.dicom), "--reports", str(bad.reports), "--labels", str(bad.labels),
            "--out", str(tmp_path / "cat"), SMALL)
    code, out, _ = run(monkeypatch, capsys, *args)
    assert code == 3
    assert "Skipped inputs (9)" in out and "CT" in out and "duplicate" in out
    code, out, _ = run(monkeypatch, capsys, *args)  # unchanged: still listed, still 3
    assert code == 3 and "Skipped inputs (9)" in out
    code, out, _ = run(monkeypatch, capsys, "data", "show", str(tmp_path / "cat"), "--json")
    doc = json.loads(out)
    assert len(doc["skipped"]) == 9 and doc["n_series"] == 4
    assert all(set(s) == {"path", "reason"} and s["reason"] for s in doc["skipped"])


@pytest.mark.parametrize("case", ["missing_folder", "bad_csv", "bad_override", "missing_reports"])
def test_user_errors_exit_2_and_change_nothing(case: str, sites, tmp_path: Path, monkeypatch, capsys) -> None:
    good, _ = sites
    cat = tmp_path / "cat"
    base = ["data", "index", str(good.dicom), "--reports", str(good.reports), "--out", str(cat), SMALL]
    assert run(monkeypatch, capsys, *base)[0] == 0
    before = _dump(cat)
    args = list(base)
    if case == "missing_folder":
        args[2] = str(tmp_path / "nowhere")
    elif case == "bad_csv":
        (tmp_path / "r.csv").write_text("accession,text\nA,b\n")
        args[4] = str(tmp_path / "r.csv")
    elif case == "bad_override":
        args.append("data.preprocess.nope=1")
    else:
        args[4] = str(tmp_path / "absent.csv")
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err and err.strip()
    assert _dump(cat) == before


def test_show_without_catalog_and_help(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run(monkeypatch, capsys, "data", "show", str(tmp_path))
    assert code == 2 and "data index" in err
    code, out, _ = run(monkeypatch, capsys, "data", "index", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("0 = everything indexed", "3 = index completed", "2 = user error"):
        assert text in flat


def test_synth_writes_sites_and_keeps_them_on_rerun(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ("data", "synth", "--sites", "1", "--series-per-site", "2", "--preset", "tiny", "--out", str(tmp_path))
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 0
    assert "site-01: 0/2" in err and "site-01: 2/2" in err, err  # progress lines: stderr is not a terminal
    site = tmp_path / "site-01"
    assert (site / "reports.csv").is_file() and (site / "labels.csv").is_file() and any((site / "dicom").rglob("*"))
    assert "site-01" in out and "(kept)" not in out
    code, out, _ = run(monkeypatch, capsys, *args)  # same arguments: the site is kept, not rewritten
    assert code == 0 and "(kept)" in out


def test_synth_bad_argument_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(monkeypatch, capsys, "data", "synth", "--sites", "0", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "sites" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing written


def _dicomdir_export(root: Path) -> Path:
    """One small series burnt as a CD would be: DICOMDIR plus PT/ST/SE/IM folders (pydicom's FileSet)."""
    import numpy as np
    from pydicom.fileset import FileSet

    from fedmri.data.volume import Volume
    from fedmri.simulations.dicom_writer import write_series

    array = np.round(np.random.default_rng(0).uniform(50, 900, (16, 14, 8))).astype(np.float32)
    paths = write_series(root / "export", Volume(array, np.diag([-1.2, -1.1, 3.0, 1.0])), {
        "PatientID": "PCD", "PatientName": "Doe^Jane", "StudyInstanceUID": "1.2.826.0.9", "StudyID": "1",
        "SeriesInstanceUID": "1.2.826.0.9.1", "StudyDate": "20240101", "StudyTime": "120000", "SeriesNumber": 1,
        "AccessionNumber": "ACD", "SeriesDescription": "t2_tse_tra"}, rng=np.random.default_rng(0))
    file_set = FileSet()
    for path in paths:
        file_set.add(path)
    file_set.write(root / "cd")
    return root / "cd" / "DICOMDIR"


def test_index_accepts_a_dicomdir_and_a_bids_dataset(tmp_path: Path, monkeypatch, capsys) -> None:
    reports = tmp_path / "reports.csv"
    reports.write_text("accession_number,study_instance_uid,findings,impression\n")
    dicomdir = _dicomdir_export(tmp_path)
    code, out, err = run(monkeypatch, capsys, "data", "index", str(dicomdir), "--reports", str(reports),
                         "--out", str(tmp_path / "cat1"), SMALL)
    assert code == 0, out + err
    import nibabel as nib
    import numpy as np

    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    nib.save(nib.Nifti1Image(np.random.default_rng(1).uniform(0, 9, (12, 12, 8)).astype(np.float32), np.eye(4)),
             bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz")
    code, out, err = run(monkeypatch, capsys, "data", "index", str(tmp_path / "cd"), "--bids", str(bids),
                         "--reports", str(reports), "--out", str(tmp_path / "cat2"), SMALL)
    assert code == 0, out + err
    code, out, _ = run(monkeypatch, capsys, "data", "show", str(tmp_path / "cat2"), "--json")
    doc = json.loads(out)
    assert doc["n_series"] == 2 and doc["by_sequence"] == {"FLAIR": 1, "T2": 1}


@pytest.mark.parametrize("case", ["not_bids", "not_dicomdir"])
def test_index_refuses_a_wrong_bids_or_dicomdir_with_exit_2(case: str, sites, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    good, _ = sites
    cat = tmp_path / "cat"
    base = ["data", "index", str(good.dicom), "--reports", str(good.reports), "--out", str(cat), SMALL]
    assert run(monkeypatch, capsys, *base)[0] == 0
    before = _dump(cat)
    args = base + ["--bids", str(good.dicom)] if case == "not_bids" else ["data", "index", str(good.reports)] + base[3:]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert ("dataset_description.json" if case == "not_bids" else "DICOMDIR") in err
    assert _dump(cat) == before


def test_progress_in_a_log_file_is_a_line_at_start_every_interval_and_at_the_end() -> None:
    from io import StringIO

    from rich.console import Console

    from fedmri.cli.data_cmd import ProgressLines

    log, now = StringIO(), [100.0]
    lines = ProgressLines(Console(file=log, width=200), every_s=30.0, clock=lambda: now[0])
    lines.update("series processed", 0, 50)  # printed: the total is known
    for done, at in ((10, 110.0), (20, 129.0), (30, 131.0), (40, 150.0), (50, 155.0)):
        now[0] = at
        lines.update("series processed", done, 50)
    assert log.getvalue().splitlines() == [
        "series processed: 0/50, 0 s",
        "series processed: 30/50, 1.0/s, 31 s",  # 30 s after the last line
        "series processed: 50/50, 0.9/s, 55 s",  # complete
    ]
    lines.update("series processed", 50, 50)  # complete already: not again
    assert len(log.getvalue().splitlines()) == 3


def test_progress_on_a_terminal_is_rich_bars_with_the_rate() -> None:
    from io import StringIO

    from rich.console import Console

    from fedmri.cli.data_cmd import _RichProgress

    screen = StringIO()
    with _RichProgress(Console(file=screen, force_terminal=True, width=120)) as progress:
        progress.start("series", 3)
        for _ in range(3):
            progress.advance("series")
    assert "series processed" in screen.getvalue() and "3/3" in screen.getvalue() and "━" in screen.getvalue()
