"""Reports written from ground truth: every finding present, absent ones negated, varied wording."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest

from fedmri.simulations.synth.anatomy import FINDING_CODES
from fedmri.simulations.synth.cohort import Patient, Study, plan_site
from fedmri.simulations.synth.reports import write_report
from fedmri.simulations.synth.sites import ARCHETYPES

# The test's own reading of the text, independent of the generator's phrase lists.
MENTIONS = {
    "mass": re.compile(r"\bmass\b"),
    "wmh": re.compile(r"white matter (t2/flair )?hyperintensit|small vessel"),
    "infarct": re.compile(r"infarct"),
    "effusion": re.compile(r"effusion"),
    "disc_herniation": re.compile(r"herniation|protrusion|extrusion"),
}
NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable|negative)\b")
SEQUENCE_WORDS = {"T1": "t1", "T1post": "post-contrast", "T2": "t2", "FLAIR": "flair", "PD": "proton density",
                  "DWI": "diffusion", "ADC": "adc"}


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.])\s+|\n", text) if s.strip()]


@pytest.fixture(scope="module")
def reports() -> list[tuple[Study, Patient, str, str]]:
    wm = np.random.default_rng(0).uniform(-20, 20, size=(500, 3)).astype(np.float32)
    out = []
    for k, site in enumerate(ARCHETYPES):  # every vendor, case mix and prevalence
        rng = np.random.default_rng(k)
        for p in plan_site(site, k + 1, 5, 120, wm, rng):
            for s in p.studies:
                findings, impression = write_report(s, p, rng)
                out.append((s, p, findings, impression))
    return out


def test_reports_mention_exactly_the_findings_present(reports: list) -> None:
    negated = defaultdict(int)
    for study, _, findings, impression in reports:
        present = {f.code for f in study.findings}
        sentences = _sentences(findings + "\n" + impression)
        for code in FINDING_CODES:
            hits = [s for s in sentences if MENTIONS[code].search(s)]
            affirmative = [s for s in hits if not NEGATION.search(s)]
            if code in present:
                assert affirmative, f"{code} present but not reported: {findings!r}"
            else:
                assert not affirmative, f"{code} absent but reported: {affirmative}"
                negated[code] += bool(hits)
    for code in ("mass", "infarct", "effusion", "disc_herniation"):
        assert negated[code] > 0, f"absent {code} is never negated"


def test_reports_name_the_exam_sequences_and_patient(reports: list) -> None:
    for study, patient, findings, _ in reports:
        text = findings.lower()
        region = {"brain": "brain", "knee": "knee", "spine": "lumbar spine"}[study.region]
        assert re.search(rf"examination: mri ((right|left) )?{region} with", text), text[:80]
        technique = text.split("technique:")[1].split("findings:")[0]
        for plan in study.series:
            assert SEQUENCE_WORDS[plan.family] in technique, (plan.family, technique)
            assert plan.plane in technique
        assert ("with contrast" in text) == study.contrast
        assert f"{int(study.age)}-year-old {'man' if patient.sex == 'M' else 'woman'}" in text


def test_reports_vary_in_wording(reports: list) -> None:
    by_code = defaultdict(set)
    for study, _, findings, _ in reports:
        for f in study.findings:
            for s in _sentences(findings):
                if MENTIONS[f.code].search(s) and not NEGATION.search(s):
                    by_code[f.code].add(re.sub(r"[\d.]+", "#", s))  # same phrasing, other numbers
    for code in FINDING_CODES:
        assert len(by_code[code]) >= 3, f"{code}: only {by_code[code]}"
    assert len({r[3] for r in reports}) > len(reports) // 3  # impressions are not a handful of templates
