"""Signal equations, tissue table and series grids of the synthetic hospitals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmri.data.metadata import infer_plane
from fedmri.simulations.synth.contrast import Acquisition, adc_map, flair_null_ti, signal, tissue_signal
from fedmri.simulations.synth.grid import series_affine, voxel_points
from fedmri.simulations.synth.tissues import TISSUES

SE_T1 = Acquisition("T1", "SE", tr=500.0, te=12.0)
SE_T2 = Acquisition("T2", "SE", tr=4000.0, te=100.0)


def test_spin_echo_matches_the_textbook_equation() -> None:
    t = TISSUES["gm"]
    expected = t.pd * (1 - math.exp(-500.0 / t.t1_15)) * math.exp(-12.0 / t.t2)
    assert tissue_signal(t, SE_T1, 1.5) == pytest.approx(expected, rel=1e-9)


def test_inversion_recovery_and_diffusion_match_the_textbook_equations() -> None:
    t = TISSUES["wm"]
    ir = Acquisition("FLAIR", "IR", tr=9000.0, te=110.0, ti=2400.0)
    t1 = t.t1(3.0)
    expected = t.pd * abs(1 - 2 * math.exp(-2400.0 / t1) + math.exp(-9000.0 / t1)) * math.exp(-110.0 / t.t2)
    assert tissue_signal(t, ir, 3.0) == pytest.approx(expected, rel=1e-9)
    dwi = Acquisition("DWI", "EP", tr=5000.0, te=80.0, b=1000.0)
    ratio = tissue_signal(t, dwi, 3.0, b=1000.0) / tissue_signal(t, dwi, 3.0)
    assert ratio == pytest.approx(math.exp(-1000.0 * t.adc * 1e-3), rel=1e-9)


@pytest.mark.parametrize("field", [1.5, 3.0])
def test_flair_nulls_csf_but_not_white_matter(field: float) -> None:
    tr = 9000.0
    acq = Acquisition("FLAIR", "IR", tr=tr, te=110.0, ti=flair_null_ti(tr, TISSUES["csf"].t1(field)))
    csf, wm = tissue_signal(TISSUES["csf"], acq, field), tissue_signal(TISSUES["wm"], acq, field)
    assert csf < 1e-6 < 0.05 < wm
    assert tissue_signal(TISSUES["wmh"], acq, field) > 1.3 * wm  # lesions stand out on FLAIR


def test_classic_brain_contrasts() -> None:
    s = {k: tissue_signal(TISSUES[k], SE_T1, 1.5) for k in ("wm", "gm", "csf", "fat")}
    assert s["fat"] > s["wm"] > s["gm"] > s["csf"]  # T1: fat bright, CSF dark
    s = {k: tissue_signal(TISSUES[k], SE_T2, 1.5) for k in ("wm", "gm", "csf")}
    assert s["csf"] > s["gm"] > s["wm"]  # T2: CSF bright
    gre = Acquisition("T1", "GR", tr=9.0, te=3.5, flip=12.0)
    s = {k: tissue_signal(TISSUES[k], gre, 3.0) for k in ("wm", "gm", "csf")}
    assert s["wm"] > s["gm"] > s["csf"]


def test_field_strength_lengthens_t1_and_changes_contrast() -> None:
    for t in TISSUES.values():
        assert t.t1(3.0) >= t.t1(1.5)
    c15 = tissue_signal(TISSUES["wm"], SE_T1, 1.5) / tissue_signal(TISSUES["gm"], SE_T1, 1.5)
    c3 = tissue_signal(TISSUES["wm"], SE_T1, 3.0) / tissue_signal(TISSUES["gm"], SE_T1, 3.0)
    assert abs(c15 - c3) > 0.02


def test_gadolinium_and_fat_saturation() -> None:
    post = Acquisition("T1post", "SE", tr=500.0, te=12.0, contrast=True)
    rim = TISSUES["tumour_rim"]
    assert tissue_signal(rim, post, 1.5) > 1.5 * tissue_signal(rim, SE_T1, 1.5)
    assert tissue_signal(TISSUES["wm"], post, 1.5) == tissue_signal(TISSUES["wm"], SE_T1, 1.5)  # intact BBB
    pd_fs = Acquisition("PD", "SE", tr=3000.0, te=30.0, fat_sat=True)
    pd = Acquisition("PD", "SE", tr=3000.0, te=30.0)
    assert tissue_signal(TISSUES["fat"], pd_fs, 3.0) < 0.2 * tissue_signal(TISSUES["fat"], pd, 3.0)
    assert tissue_signal(TISSUES["fluid"], pd_fs, 3.0) == tissue_signal(TISSUES["fluid"], pd, 3.0)


def test_partial_volume_is_linear_and_adc_map_recovers_adc() -> None:
    acq = Acquisition("ADC", "EP", tr=5000.0, te=80.0, b=1000.0)
    frac = {"wm": np.array([1.0, 0.0, 0.5], np.float32), "infarct": np.array([0.0, 1.0, 0.5], np.float32)}
    s0 = signal(frac, TISSUES, acq, 3.0)
    assert s0[2] == pytest.approx(0.5 * (s0[0] + s0[1]), rel=1e-5)
    adc = adc_map(s0, signal(frac, TISSUES, acq, 3.0, b=1000.0), 1000.0, floor=0.0)
    assert adc[0] == pytest.approx(TISSUES["wm"].adc * 1000, rel=1e-3)
    assert adc[1] == pytest.approx(TISSUES["infarct"].adc * 1000, rel=1e-3)  # infarct: low ADC


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_series_affine_is_centred_right_handed_and_in_its_plane(plane: str) -> None:
    shape, centre = (10, 8, 6), np.array([5.0, -20.0, 30.0])
    aff = series_affine(plane, centre, shape, (2.0, 2.0, 4.0))
    assert np.linalg.det(aff[:3, :3]) > 0  # k runs along row x col, as DICOM readers order slices
    mid = aff @ np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2, 1.0])
    np.testing.assert_allclose(mid[:3], centre, atol=1e-9)
    assert infer_plane(aff) == plane
    assert infer_plane(series_affine(plane, centre, shape, (2.0, 2.0, 4.0), tilt_deg=25.0)) == "oblique"
    with pytest.raises(ValueError, match="plane"):
        series_affine("diagonal", centre, shape, (1.0, 1.0, 1.0))


def test_voxel_points_follow_the_affine_and_spread_through_the_slice() -> None:
    shape = (4, 3, 5)
    aff = series_affine("sagittal", (1.0, 2.0, 3.0), shape, (1.5, 2.0, 4.0), tilt_deg=10.0)
    pts = voxel_points(aff, shape, n_sub=2)  # 2, N, 3
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    centres = ijk @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(pts.mean(axis=0), centres, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(pts[1] - pts[0], axis=1), 2.0, atol=1e-4)  # half a 4 mm slice
