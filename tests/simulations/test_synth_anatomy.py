"""Synthetic anatomy: lesions where the masks say, age and sex effects visible in images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage, stats

from fedmri.simulations.synth.anatomy import MASK_LABELS, Anatomy, Finding, Pose
from fedmri.simulations.synth.brain import BrainAnatomy
from fedmri.simulations.synth.brain_atlas import BrainAtlas, load_atlas
from fedmri.simulations.synth.cohort import plan_site
from fedmri.simulations.synth.contrast import Acquisition, flair_null_ti
from fedmri.simulations.synth.generate import build_anatomy
from fedmri.simulations.synth.grid import series_affine, voxel_points
from fedmri.simulations.synth.knee import KneeAnatomy
from fedmri.simulations.synth.render import Chain, render_series, shows
from fedmri.simulations.synth.sites import ARCHETYPES
from fedmri.simulations.synth.spine import SpineAnatomy

FIELD = 3.0
T2 = Acquisition("T2", "SE", tr=4000.0, te=100.0)
T1 = Acquisition("T1", "SE", tr=500.0, te=12.0)
T1POST = Acquisition("T1post", "SE", tr=500.0, te=12.0, contrast=True)
FLAIR = Acquisition("FLAIR", "IR", tr=9000.0, te=110.0, ti=flair_null_ti(9000.0, 4300.0))
DWI = Acquisition("DWI", "EP", tr=5000.0, te=80.0, b=1000.0)
ADC = Acquisition("ADC", "EP", tr=5000.0, te=80.0, b=1000.0)
T2FS = Acquisition("T2", "SE", tr=4000.0, te=70.0, fat_sat=True)
STILL = Pose(np.eye(3), np.zeros(3), 1.0)


@pytest.fixture(scope="module")
def atlas() -> BrainAtlas:
    return load_atlas(2)


def _render(anatomy: Anatomy, acq: Acquisition, plane: str, centre: np.ndarray, shape: tuple[int, int, int],
            spacing: tuple[float, float, float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    aff = series_affine(plane, centre, shape, spacing)
    return render_series(anatomy, acq, aff, shape, Chain(FIELD, snr=60.0, bias=0.0, level=1000.0),
                         np.random.default_rng(seed))


def _contrast(image: np.ndarray, mask: np.ndarray, code: str) -> float:
    """Mean intensity in the lesion over the mean in a 2-voxel ring of tissue around it."""
    lesion = mask == MASK_LABELS[code]
    assert lesion.sum() >= 5, f"{code}: too few lesion voxels to compare"
    ring = ndimage.binary_dilation(lesion, iterations=2) & (mask == 0) & (image > 0.05 * image.max())
    return float(image[lesion].mean() / image[ring].mean())


def test_brain_fractions_are_valid_partial_volumes(atlas: BrainAtlas) -> None:
    brain = BrainAnatomy(atlas, STILL, 50.0)
    shape = (40, 48, 36)
    tissues, lesions = brain.sample_grid(series_affine("axial", (0, -18, 10), shape, (4.0, 4.0, 4.0)), shape, 2)
    total = sum(tissues.values())
    assert total.min() >= -1e-5 and total.max() <= 1.0 + 1e-4
    assert {"gm", "wm", "csf", "bone", "fat"} <= set(tissues) and not lesions
    # The grid path (affine_transform) and the point path (trilinear) agree.
    aff = series_affine("axial", (0, -18, 10), shape, (4.0, 4.0, 4.0))
    by_points, _ = brain.sample(voxel_points(aff, shape, 2))
    np.testing.assert_allclose(by_points["wm"], tissues["wm"], atol=2e-3)


def test_brain_lesions_show_where_the_mask_is(atlas: BrainAtlas) -> None:
    rng = np.random.default_rng(3)
    wm = atlas.wm_points[rng.choice(len(atlas.wm_points), 8, replace=False)]
    wm = wm[wm[:, 0] < -5]  # left hemisphere, away from the mass
    findings = (
        Finding("mass", "right frontal lobe", None, {"centre": (30.0, 28.0, 28.0), "radii": (14.0, 13.0, 12.0),
                                                     "necrotic": True, "edema_scale": 1.0}),
        Finding("wmh", "deep white matter", None, {"centres": wm.tolist(), "radii": [(6.0, 6.0, 5.0)] * len(wm)}),
        Finding("infarct", "left parietal lobe", None, {"centre": (-40.0, -46.0, 38.0), "radii": (12.0, 11.0, 11.0)}),
    )
    brain = BrainAnatomy(atlas, STILL, 40.0, findings)
    grid = ("axial", np.array([0.0, -15.0, 20.0]), (80, 100, 24), (2.0, 2.0, 4.0))
    t2, mask = _render(brain, T2, *grid)
    assert {MASK_LABELS[c] for c in ("mass", "wmh", "infarct")} <= set(np.unique(mask))
    assert _contrast(t2, mask, "mass") > 1.3  # tumour and necrosis are T2 bright
    flair, mask_f = _render(brain, FLAIR, *grid)
    np.testing.assert_array_equal(mask, mask_f)  # all three show on both: the same ground truth
    assert _contrast(flair, mask, "wmh") > 1.2
    assert _contrast(_render(brain, DWI, *grid)[0], mask, "infarct") > 1.4  # restricted diffusion
    assert _contrast(_render(brain, ADC, *grid)[0], mask, "infarct") < 0.75
    pre, post = _render(brain, T1, *grid)[0], _render(brain, T1POST, *grid)[0]
    mass = mask == MASK_LABELS["mass"]
    normal = (mask == 0) & (pre > 0.1 * pre.max())
    gain = (post[mass].mean() / post[normal].mean()) / (pre[mass].mean() / pre[normal].mean())
    assert gain > 1.3  # the mass enhances relative to brain behind an intact barrier
    # A series' mask holds the lesions that show on it: WMH are invisible on T1 before and after contrast.
    t1_labels, post_labels = (set(np.unique(_render(brain, acq, *grid)[1])) for acq in (T1, T1POST))
    assert MASK_LABELS["wmh"] not in t1_labels | post_labels
    assert MASK_LABELS["mass"] in post_labels


def test_a_lesion_shows_by_its_contrast_with_normal_tissue_around_it() -> None:
    shape = (20, 20, 20)
    core, oedema = np.zeros(shape, bool), np.zeros(shape, bool)
    core[8:12, 8:12, 8:12] = True
    oedema[5:15, 5:15, 5:15] = True
    occ = core.astype(np.float32).ravel()
    image = np.full(shape, 100.0, np.float32)
    image[oedema] = 160.0  # bright oedema right around the core
    for core_value, expected in ((110.0, False), (130.0, True), (70.0, True)):
        image[core] = core_value
        # Judged against the normal tissue past the oedema (100), not against the oedema (160).
        assert shows(image.ravel(), occ, oedema.ravel(), shape) is expected, core_value
    assert not shows(image.ravel(), np.zeros_like(occ), oedema.ravel(), shape)  # no core, nothing to show


def test_knee_effusion_is_bright_on_fluid_sensitive_images() -> None:
    knee = KneeAnatomy(STILL, 35.0, 8.0, (Finding("effusion", "suprapatellar recess", None, {"severity": 1.0}),))
    image, mask = _render(knee, T2FS, "axial", np.array([0.0, 10.0, 30.0]), (64, 64, 16), (2.5, 2.5, 4.0))
    assert _contrast(image, mask, "effusion") > 1.5
    healthy = KneeAnatomy(STILL, 35.0, 8.0)
    assert not _render(healthy, T2FS, "axial", np.array([0.0, 10.0, 30.0]), (64, 64, 16), (2.5, 2.5, 4.0))[1].any()


def test_disc_herniation_is_dark_against_the_csf_it_displaces() -> None:
    f = Finding("disc_herniation", "L4-L5", (7.0,), {"level": "L4-L5", "x": -7.0, "depth_mm": 7.0})
    spine = SpineAnatomy(STILL, 45.0, 20.0, (f,))
    centre = spine.disc_centre("L4-L5") + np.array([0.0, -20.0, 0.0])
    image, mask = _render(spine, T2, "axial", centre, (64, 64, 12), (1.5, 1.5, 3.0))
    assert _contrast(image, mask, "disc_herniation") < 0.8
    lesion = np.argwhere(mask > 0).mean(axis=0)
    aff = series_affine("axial", centre, (64, 64, 12), (1.5, 1.5, 3.0))
    assert (aff @ np.append(lesion, 1.0))[0] < 0  # a left paracentral herniation lies on the patient's left


@pytest.fixture(scope="module")
def brains(atlas: BrainAtlas) -> list[tuple[float, str, float, float]]:
    """(age, sex, head volume ml, central CSF volume ml) from T2 images of planned patients."""
    site = dataclasses.replace(ARCHETYPES[0], region_mix={"brain": 1.0}, second_study_rate=0.0,
                               prevalence={k: 0.0 for k in ARCHETYPES[0].prevalence}, age_sd=20.0)
    patients = plan_site(site, 1, 11, 130, atlas.wm_points, np.random.default_rng(11))
    out = []
    for p in patients[:28]:
        anatomy = build_anatomy(p.studies[0], p, atlas)
        shape, spacing = (50, 58, 46), (4.5, 4.5, 4.5)
        aff = series_affine("axial", anatomy.centre_world, shape, spacing)
        image, _ = render_series(anatomy, T2, aff, shape, Chain(FIELD, 60.0, 0.0, 1000.0), np.random.default_rng(0))
        voxel_ml = 4.5**3 / 1000.0
        head = image > 0.08 * image.max()
        local = anatomy.pose.to_local(voxel_points(aff, shape)[0]).reshape(*shape, 3)
        central = (np.abs(local[..., 0]) < 25) & (np.abs(local[..., 1] + 12) < 35) & (np.abs(local[..., 2] - 14) < 16)
        csf = central & (image > 0.45 * image.max())
        out.append((p.studies[0].age, p.sex, head.sum() * voxel_ml, csf.sum() * voxel_ml))
    return out


def test_ventricular_csf_grows_with_age(brains: list[tuple[float, str, float, float]]) -> None:
    ages = [b[0] for b in brains]
    relative_csf = [b[3] / b[2] for b in brains]  # per head volume, so head size does not confound
    assert np.ptp(ages) > 30
    rho = stats.spearmanr(ages, relative_csf).statistic
    assert rho > 0.75, f"Spearman(age, central CSF / head volume) = {rho:.2f}"


def test_men_have_larger_heads_on_average(brains: list[tuple[float, str, float, float]]) -> None:
    men = [b[2] for b in brains if b[1] == "M"]
    women = [b[2] for b in brains if b[1] == "F"]
    assert len(men) >= 5 and len(women) >= 5
    assert np.mean(men) > 1.1 * np.mean(women)  # 7% linear is ~22% in volume
