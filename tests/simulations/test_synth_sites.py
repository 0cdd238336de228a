"""Site profiles and series layout: a non-IID federation, not copies of one site."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.data.metadata import infer_plane
from fedmri.simulations.synth.anatomy import Pose
from fedmri.simulations.synth.cohort import plan_site
from fedmri.simulations.synth.knee import KneeAnatomy
from fedmri.simulations.synth.layout import PRESETS, series_grid
from fedmri.simulations.synth.protocols import SeriesPlan, study_protocol, trim_protocol
from fedmri.simulations.synth.sites import ARCHETYPES, site_profile
from fedmri.simulations.synth.spine import SpineAnatomy

STILL = Pose(np.eye(3), np.zeros(3), 1.0)


def test_first_sites_differ_like_hospitals() -> None:
    sites = [site_profile(k, np.random.default_rng([0, k])) for k in (1, 2, 3)]
    assert len({s.manufacturer for s in sites}) == 3
    assert {s.field_strength for s in sites} == {1.5, 3.0}
    assert [s.body_part_tag for s in sites].count(False) == 1  # one site leaves BodyPartExamined empty
    assert len({max(s.region_mix, key=s.region_mix.get) for s in sites}) == 3  # different case mix
    assert max(s.level for s in sites) > 3 * min(s.level for s in sites)  # arbitrary vendor scaling


def test_balanced_case_mix_keeps_the_scanner_and_evens_out_the_patients() -> None:
    own = site_profile(4, np.random.default_rng([0, 4]))
    balanced = site_profile(4, np.random.default_rng([0, 4]), case_mix="balanced")
    assert balanced.manufacturer == own.manufacturer and balanced.field_strength == own.field_strength
    assert own.region_mix["brain"] > 0.6 and 0.4 < balanced.region_mix["brain"] < 0.6
    assert all(0.3 <= balanced.prevalence[k] for k in ("mass", "infarct", "effusion", "disc_herniation"))
    with pytest.raises(ValueError, match="unknown case mix 'rare'"):
        site_profile(1, np.random.default_rng(0), case_mix="rare")


def test_every_site_sees_enough_of_each_brain_finding() -> None:
    # A finding that one site almost never sees is learnt as that site's scanner, not as disease.
    for k in range(1, len(ARCHETYPES) + 1):
        site = site_profile(k, np.random.default_rng([0, k]))
        assert site.prevalence["mass"] >= 0.2 and site.prevalence["infarct"] >= 0.15, site.institution


def test_repeated_archetypes_are_jittered_not_copied() -> None:
    a = site_profile(1, np.random.default_rng([0, 1]))
    b = site_profile(1 + len(ARCHETYPES), np.random.default_rng([0, 1 + len(ARCHETYPES)]))
    assert a.manufacturer == b.manufacturer and a.institution != b.institution
    assert a.snr != b.snr and a.region_mix != b.region_mix


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_cohort_plans_exactly_the_requested_series(n: int) -> None:
    site = site_profile(1, np.random.default_rng(0))
    patients = plan_site(site, 1, 0, n, np.zeros((50, 3), np.float32), np.random.default_rng(1))
    series = [uid for p in patients for s in p.studies for uid in s.series_uids]
    assert len(series) == n == len(set(series))
    assert len({p.patient_id for p in patients}) == len(patients)
    if n == 40:
        assert 8 <= len(patients) <= 20  # several series per study, a few patients with two studies


def test_trimmed_protocol_keeps_the_key_series_in_order() -> None:
    full = study_protocol("brain", ARCHETYPES[0], contrast=True, rng=np.random.default_rng(0))
    assert [p.family for p in full] == ["T1", "T2", "FLAIR", "DWI", "ADC", "T1post"]
    assert [p.family for p in trim_protocol(full, 2)] == ["T2", "FLAIR"]
    assert [p.family for p in trim_protocol(full, 1)] == ["FLAIR"]


def test_one_site_angulates_axials_obliquely_and_others_do_not() -> None:
    spine = SpineAnatomy(STILL, 50.0, 20.0)
    planes = {}
    for k in range(1, len(ARCHETYPES) + 1):
        site = site_profile(k, np.random.default_rng([0, k]))
        aff, _ = series_grid(SeriesPlan("T2", "axial"), spine, site, PRESETS["demo"], np.random.default_rng(k))
        planes[site.institution] = infer_plane(aff)
    assert sorted(planes.values()).count("oblique") == 1, planes


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_series_sizes_stay_in_the_preset_ranges(preset: str) -> None:
    p = PRESETS[preset]
    knee = KneeAnatomy(STILL, 40.0, 8.0)
    for k in range(1, len(ARCHETYPES) + 1):
        site = site_profile(k, np.random.default_rng([3, k]))
        for plane in ("sagittal", "coronal", "axial"):
            aff, shape = series_grid(SeriesPlan("PD", plane), knee, site, p, np.random.default_rng(k))
            spacing = np.linalg.norm(aff[:3, :3], axis=0)
            assert p.matrix[0] <= min(shape[:2]) and max(shape[:2]) <= p.matrix[1]
            assert p.slices[0] <= shape[2] <= p.slices[1]
            assert p.slice_mm[0] - 1e-6 <= spacing[2] <= p.slice_mm[1] + 1e-6
            assert 0.8 * p.inplane_mm[0] <= spacing[0] <= 1.25 * p.inplane_mm[1]
