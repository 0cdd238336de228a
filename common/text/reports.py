"""Radiology report text as the text tower reads it.

A report reaches the tower as one string: the IMPRESSION first, then the
FINDINGS, each with its header, whitespace normalised. The impression comes
first because the tokenizer truncates from the end: when a report is longer
than the tower's limit, the tail of the findings is dropped and the
radiologist's summary survives.
"""

from __future__ import annotations

import re

from fedmri.errors import InputError

# Section headers recognised in free-text reports (case-insensitive, followed by
# a colon). Only findings and impression are kept; the others end a section.
_FINDINGS = ("findings", "finding")
_IMPRESSION = ("impression", "impressions", "conclusion", "conclusions")
_OTHER = (
    "history", "clinical history", "clinical information", "indication", "indications",
    "technique", "comparison", "procedure", "exam", "examination", "recommendation",
    "recommendations", "addendum", "contrast",
)
_HEADER = re.compile(
    r"(?<![A-Za-z])(" + "|".join(sorted(_FINDINGS + _IMPRESSION + _OTHER, key=len, reverse=True))
    + r")\s*:",
    re.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs, non-breaking spaces) to one space."""
    return _WHITESPACE.sub(" ", text.replace("\u00a0", " ")).strip()


def split_sections(text: str) -> dict[str, str]:
    """Find the FINDINGS and IMPRESSION sections of a free-text report.

    A section runs from its header (``FINDINGS:``, ``Impression:``,
    ``CONCLUSION:`` ...) to the next recognised header. Repeated sections are
    joined in order.

    Args:
        text: The whole report.

    Returns:
        ``{"findings": ..., "impression": ...}`` with only the sections found,
        whitespace normalised; empty when the report has no such header.
    """
    matches = list(_HEADER.finditer(text))
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = m.group(1).lower()
        body = normalize_whitespace(text[m.end(): nxt.start() if nxt else len(text)])
        if not body:
            continue
        if name in _FINDINGS:
            parts["findings"].append(body)
        elif name in _IMPRESSION:
            parts["impression"].append(body)
    return {k: " ".join(v) for k, v in parts.items() if v}


def prepare_report(
    text: str | None = None,
    *,
    findings: str | None = None,
    impression: str | None = None,
) -> str:
    """The one string the text tower encodes for a report.

    Separate ``findings`` / ``impression`` fields win; otherwise both are parsed
    out of ``text`` by their headers, and a report without any recognised
    header is used whole (as findings).

    Args:
        text: Free-text report, used when neither field is given.
        findings: The FINDINGS section, if the site stores it on its own.
        impression: The IMPRESSION section, if the site stores it on its own.

    Returns:
        ``"Impression: ... Findings: ..."`` (sections that are empty are left out).

    Raises:
        InputError: If there is no text at all.
    """
    if findings is None and impression is None:
        if text is None:
            raise InputError("a report needs free text or a findings/impression field; got none")
        sections = split_sections(text)
        if not sections:
            sections = {"findings": normalize_whitespace(text)}
        findings, impression = sections.get("findings"), sections.get("impression")
    pieces = []
    if impression and normalize_whitespace(impression):
        pieces.append(f"Impression: {normalize_whitespace(impression)}")
    if findings and normalize_whitespace(findings):
        pieces.append(f"Findings: {normalize_whitespace(findings)}")
    if not pieces:
        raise InputError("report has no findings or impression text; check the report column of reports.csv")
    return " ".join(pieces)
