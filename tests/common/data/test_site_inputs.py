"""reports.csv / labels.csv: good rows are used, bad rows are reported with their line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmri.data.site_inputs import FINDING_CODES, read_labels, read_reports
from fedmri.errors import InputError


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_reports_good_rows_and_multiline_quotes(tmp_path: Path) -> None:
    path = _write(tmp_path / "reports.csv", (
        "\ufeffaccession_number,study_instance_uid,findings,impression\n"
        'A1,1.2.3,"Mass in the left\nfrontal lobe, 2 cm.",Likely glioma.\n'
        ",1.2.4,Normal.,No acute findings.\n"
    ))
    rows, skipped = read_reports(path)
    assert skipped == []
    assert [(r.line, r.accession_number, r.study_instance_uid) for r in rows] == [(2, "A1", "1.2.3"), (4, "", "1.2.4")]
    assert rows[0].findings == "Mass in the left\nfrontal lobe, 2 cm." and rows[1].impression == "No acute findings."


def test_reports_bad_rows_are_skipped_with_their_line(tmp_path: Path) -> None:
    latin1 = "A3,1.2.7,Läsion,keine\n".encode("latin-1")
    path = _write(tmp_path / "reports.csv", (
        b"accession_number,study_instance_uid,findings,impression\n"
        b"A1,1.2.3,Normal.,Normal.\n"
        b"A2,1.2.5,too,many,fields\n" + latin1 +
        b",,orphan,text\n"
        b"A1,1.2.3,again,again\n"
        b"A4,1.2.8,,\n"
        b"\n"
        b"A5,1.2.9,Fine.,Fine.\n"
    ))
    rows, skipped = read_reports(path)
    assert [r.accession_number for r in rows] == ["A1", "A5"]
    lines = {s.path.rsplit(":", 1)[1]: s.reason for s in skipped}
    assert set(lines) == {"3", "4", "5", "6", "7"}
    assert "5 fields" in lines["3"]
    assert "UTF-8" in lines["4"] and "re-save" in lines["4"]
    assert "neither" in lines["5"]
    assert "first at line 2" in lines["6"]
    assert "no findings" in lines["7"]
    assert all(s.path.startswith(str(path)) for s in skipped)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"accession_number,findings\nA1,x\n", "study_instance_uid"),
        (None, "does not exist"),
    ],
)
def test_unusable_report_files_are_input_errors(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "reports.csv"
    if content is not None:
        _write(path, content)
    with pytest.raises(InputError, match=match):
        read_reports(path)


def test_labels_parse_values_and_masks(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "m1.nii.gz").write_bytes(b"x")
    path = _write(tmp_path / "labels.csv", (
        "series_instance_uid,findings,age,sex,mask\n"
        "1.1,mass;WMH,45.5,f,masks/m1.nii.gz\n"
        "1.2,,,,\n"
    ))
    rows, skipped = read_labels(path)
    assert skipped == []
    assert rows[0].findings == ("mass", "wmh") and rows[0].age == 45.5 and rows[0].sex == "F"
    assert rows[0].mask == (tmp_path / "masks" / "m1.nii.gz").resolve()
    assert rows[1].findings == () and rows[1].age is None and rows[1].sex is None and rows[1].mask is None


def test_labels_bad_values_skip_the_row_and_name_each_problem(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.csv", (
        "series_instance_uid,findings,age,sex,mask\n"
        "1.1,tumour,45,M,\n"
        "1.2,mass,45y,X,\n"
        "1.3,,-4,F,\n"
        "1.4,,40,F,masks/missing.nii.gz\n"
        "1.5,infarct,70,M,\n"
        "1.5,infarct,70,M,\n"
        ",mass,1,M,\n"
    ))
    rows, skipped = read_labels(path)
    assert [r.series_instance_uid for r in rows] == ["1.5"]
    reasons = {s.path.rsplit(":", 1)[1]: s.reason for s in skipped}
    assert "tumour" in reasons["2"] and ", ".join(FINDING_CODES) in reasons["2"]
    assert "45y" in reasons["3"] and "'X'" in reasons["3"]
    assert "outside" in reasons["4"]
    assert "missing.nii.gz" in reasons["5"]
    assert "first at line 6" in reasons["7"]
    assert "empty series_instance_uid" in reasons["8"]
