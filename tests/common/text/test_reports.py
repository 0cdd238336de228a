"""Report preprocessing: sections, order, whitespace, errors."""

from __future__ import annotations

import pytest

from fedmri.errors import InputError
from fedmri.text import normalize_whitespace, prepare_report, split_sections

REPORT = """EXAMINATION: MRI brain with contrast
CLINICAL HISTORY: headache.

FINDINGS:
  A 12 mm enhancing lesion
  in the left frontal lobe.\tNo midline shift.

IMPRESSION: Solitary left frontal lesion;
metastasis likely.
RECOMMENDATION: follow-up in 3 months.
"""


def test_split_sections_finds_findings_and_impression_and_stops_at_other_headers() -> None:
    sections = split_sections(REPORT)
    assert sections == {
        "findings": "A 12 mm enhancing lesion in the left frontal lobe. No midline shift.",
        "impression": "Solitary left frontal lesion; metastasis likely.",
    }


def test_split_sections_is_case_insensitive_and_works_inline() -> None:
    sections = split_sections("findings: small focus. Conclusion: benign.")
    assert sections == {"findings": "small focus.", "impression": "benign."}


def test_split_sections_without_headers_is_empty() -> None:
    assert split_sections("No acute abnormality.") == {}


def test_prepare_report_puts_impression_first_so_truncation_cuts_findings() -> None:
    text = prepare_report(REPORT)
    assert text.startswith("Impression: Solitary left frontal lesion")
    assert text.index("Impression:") < text.index("Findings:")
    assert "headache" not in text and "follow-up" not in text


def test_prepare_report_fields_win_over_text_and_whitespace_is_normalised() -> None:
    text = prepare_report("FINDINGS: ignored", findings=" large\n\nmass ", impression=None)
    assert text == "Findings: large mass"


def test_prepare_report_without_headers_uses_the_whole_text() -> None:
    assert prepare_report("  Normal   study.\n") == "Findings: Normal study."


@pytest.mark.parametrize("kwargs", [{}, {"text": "   "}, {"findings": " ", "impression": "\n"}])
def test_prepare_report_rejects_empty_reports(kwargs: dict) -> None:
    with pytest.raises(InputError):
        prepare_report(**kwargs)


def test_normalize_whitespace() -> None:
    assert normalize_whitespace("a\u00a0 b\n\tc ") == "a b c"
