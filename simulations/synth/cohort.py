"""A site's patients and studies: demographics, identifiers, findings, protocols.

Everything is drawn from the site's seed before any image is rendered, so the
plan alone fixes every identifier, label and report. Identifiers are
synthetic and carry the site index, so they are unique across the sites of a
federation; UIDs are derived from (seed, site, counter) and so reproducible.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import generate_uid

from fedmri.simulations.synth.anatomy import Finding
from fedmri.simulations.synth.findings import brain_findings, knee_findings, spine_findings
from fedmri.simulations.synth.protocols import SeriesPlan, study_protocol, trim_protocol
from fedmri.simulations.synth.sites import SiteProfile

_FIRST = {"F": ("ANNA", "MARIA", "JANE", "LENA", "SOFIA", "NORA", "EMMA", "IDA", "CLARA", "ROSA", "MEI", "AMINA"),
          "M": ("JOHN", "PAUL", "ERIK", "LUCA", "OMAR", "IVAN", "LEO", "MAX", "HUGO", "NOAH", "KENJI", "TARIK")}
_SYLLABLES = ("KAL", "VER", "MO", "DAN", "TRE", "LIS", "BOR", "NAK", "SEL", "PEN", "RU", "GOT", "FAR", "MIL",
              "OST", "ZAN", "QUI", "HEL", "DOR", "ABE")
_AGE_OFFSET = {"brain": 3.0, "knee": -10.0, "spine": 0.0}


@dataclass
class Study:
    """One imaging study: a region, its findings, and its series plans."""

    region: str
    age: float
    date: dt.date
    accession: str
    study_uid: str
    frame_uid: str
    contrast: bool
    laterality: str | None
    findings: tuple[Finding, ...]
    series: list[SeriesPlan]
    series_uids: list[str]
    anatomy_seed: int


@dataclass
class Patient:
    """A synthetic patient with one or two studies."""

    patient_id: str
    name: str
    sex: str
    birth_date: dt.date
    scale: float
    adiposity: float
    atrophy_jitter: float
    studies: list[Study] = field(default_factory=list)


class _Ids:
    """Reproducible, site-unique identifiers."""

    def __init__(self, seed: int, site_index: int, prefix: str, rng: np.random.Generator) -> None:
        self.seed, self.site, self.prefix, self.n = seed, site_index, prefix, 0
        self.serials = iter(rng.permutation(np.arange(10000, 100000)))

    def uid(self, kind: str) -> str:
        self.n += 1
        return str(generate_uid(entropy_srcs=["fedmri-synth", str(self.seed), str(self.site), kind, str(self.n)]))

    def patient_id(self) -> str:
        return f"{self.prefix}{self.site:02d}{int(next(self.serials)):05d}"

    def accession(self, date: dt.date) -> str:
        return f"A{self.site:02d}{date:%y%m}{int(next(self.serials)):05d}"


def _name(sex: str, rng: np.random.Generator) -> str:
    last = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
    return f"{last}^{rng.choice(_FIRST[sex])}"


def plan_site(site: SiteProfile, site_index: int, seed: int, n_series: int, wm_points: np.ndarray,
              rng: np.random.Generator) -> list[Patient]:
    """Patients and studies whose series add up to exactly ``n_series``.

    Args:
        site: the site profile.
        site_index: 1-based index (goes into identifiers).
        seed: federation seed (goes into UIDs).
        n_series: series to plan in total.
        wm_points: candidate white-matter points for WMH (MNI mm).
        rng: the site's random source.
    """
    ids = _Ids(seed, site_index, site.id_prefix, rng)
    regions, weights = list(site.region_mix), np.array(list(site.region_mix.values()))
    patients: list[Patient] = []
    left = n_series
    while left > 0:
        sex = "M" if rng.random() < site.male_fraction else "F"
        first_region = str(rng.choice(regions, p=weights / weights.sum()))
        age = float(np.clip(rng.normal(site.age_mean + _AGE_OFFSET[first_region], site.age_sd), 16.0, 92.0))
        date = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
        birth = date - dt.timedelta(days=int(age * 365.25))
        size = (1.035 if sex == "M" else 0.965) * rng.normal(1.0, 0.025)  # men ~7% larger linearly
        patient = Patient(ids.patient_id(), _name(sex, rng), sex, birth, float(size),
                          float(rng.normal(0.0, 1.0)), float(rng.normal(0.0, 0.08)))
        n_studies = 2 if rng.random() < site.second_study_rate else 1
        region = first_region
        for s in range(n_studies):
            if left <= 0:
                break
            if s == 1:  # a second study images another region, months later
                others = [r for r in regions if r != first_region]
                region = str(rng.choice(others))
                date = date + dt.timedelta(days=int(rng.integers(30, 500)))
            study = _plan_study(site, region, patient, date, ids, wm_points, rng, left)
            patient.studies.append(study)
            left -= len(study.series)
        patients.append(patient)
    return patients


def _plan_study(site: SiteProfile, region: str, patient: Patient, date: dt.date, ids: _Ids,
                wm_points: np.ndarray, rng: np.random.Generator, room: int) -> Study:
    age = (date - patient.birth_date).days / 365.25
    if region == "brain":
        findings = brain_findings(site, age, wm_points, rng)
        has_mass = any(f.code == "mass" for f in findings)
        contrast = bool(rng.random() < (0.9 if has_mass else site.contrast_rate))
    elif region == "knee":
        findings, contrast = knee_findings(site, age, rng), False
    else:
        findings, contrast = spine_findings(site, age, rng), False
    plans = trim_protocol(study_protocol(region, site, contrast, rng), room)
    contrast = contrast and any(p.family == "T1post" for p in plans)
    return Study(region=region, age=age, date=date, accession=ids.accession(date), study_uid=ids.uid("study"),
                 frame_uid=ids.uid("frame"), contrast=contrast,
                 laterality=("R" if rng.random() < 0.55 else "L") if region == "knee" else None,
                 findings=tuple(findings), series=plans, series_uids=[ids.uid("series") for _ in plans],
                 anatomy_seed=int(rng.integers(0, 2**31)))
