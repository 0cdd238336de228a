"""Size presets and where each series' slab goes.

A preset fixes the ranges a series may take (matrix, slice count, voxel
size); the site profile says where in those ranges the hospital sits (fine or
coarse); the region and plane set the field of view and the coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmri.simulations.synth.anatomy import Anatomy
from fedmri.simulations.synth.grid import series_affine
from fedmri.simulations.synth.protocols import SeriesPlan
from fedmri.simulations.synth.sites import SiteProfile


@dataclass(frozen=True)
class Preset:
    """Ranges for series size.

    Attributes:
        matrix: (min, max) in-plane matrix.
        slices: (min, max) slices per series.
        inplane_mm: (fine, coarse) in-plane voxel size.
        slice_mm: (fine, coarse) slice thickness.
        atlas_mm: resolution of the brain atlas grid (1 or 2 mm).
    """

    matrix: tuple[int, int]
    slices: tuple[int, int]
    inplane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    atlas_mm: int


PRESETS: dict[str, Preset] = {
    # Coarse and quick, for tests and smoke runs: a site of 6 series takes a few seconds.
    "tiny": Preset(matrix=(40, 64), slices=(10, 20), inplane_mm=(3.5, 5.0), slice_mm=(5.0, 7.0), atlas_mm=2),
    # Small enough that 3 sites x 40 series take ~40 s of CPU per site and ~80 MB.
    "demo": Preset(matrix=(96, 128), slices=(20, 40), inplane_mm=(1.5, 2.5), slice_mm=(3.0, 5.0), atlas_mm=2),
    # Clinical sizes: 256-384 matrices, sub-millimetre pixels.
    "full": Preset(matrix=(256, 384), slices=(24, 120), inplane_mm=(0.6, 1.0), slice_mm=(2.0, 4.0), atlas_mm=1),
}

# (in-plane field of view, through-plane coverage) in mm per region and plane.
_FOV = {
    ("brain", "axial"): (230.0, 150.0), ("brain", "sagittal"): (240.0, 150.0), ("brain", "coronal"): (230.0, 170.0),
    ("knee", "sagittal"): (160.0, 110.0), ("knee", "coronal"): (160.0, 100.0), ("knee", "axial"): (150.0, 120.0),
    ("spine", "sagittal"): (300.0, 70.0), ("spine", "axial"): (190.0, 100.0),
}


def series_grid(plan: SeriesPlan, anatomy: Anatomy, site: SiteProfile, preset: Preset,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of one series' slab, placed on the anatomy.

    Args:
        plan: the series (plane).
        anatomy: the patient's region (its centre and pose).
        site: resolution preferences and angulation.
        preset: size ranges.
        rng: random source (slab placement jitter).
    """
    fov, coverage = _FOV[(anatomy.region, plan.plane)]
    fov *= rng.uniform(0.95, 1.05)
    lo, hi = preset.inplane_mm
    target = (lo + (hi - lo) * site.inplane_pos) * rng.uniform(0.95, 1.05)
    m_lo, m_hi = preset.matrix
    ni = int(np.clip(round(fov / target / 8.0) * 8, m_lo, m_hi))
    phase = rng.uniform(0.8, 1.0) if plan.plane == "axial" else 1.0  # rectangular FOV on axials
    nj = int(np.clip(round(ni * phase / 8.0) * 8, m_lo, m_hi))
    d = fov / ni
    t_lo, t_hi = preset.slice_mm
    thick = float(np.clip((t_lo + (t_hi - t_lo) * site.slice_pos) * rng.uniform(0.93, 1.07), t_lo, t_hi))
    nk = int(np.clip(round(coverage / thick), *preset.slices))
    centre = anatomy.centre_world
    if anatomy.region == "spine" and plan.plane == "axial":
        centre = anatomy.pose.to_world(anatomy.disc_centre("L4-L5"))  # type: ignore[attr-defined]
    if anatomy.region == "brain" and plan.plane == "axial":
        centre = centre + np.array([0.0, 0.0, 10.0])  # skip most of the skull base
    centre = centre + rng.uniform(-4.0, 4.0, 3)
    tilt = rng.uniform(-3.0, 3.0)
    if plan.plane == "axial" and anatomy.region in ("brain", "spine"):
        tilt = site.oblique_deg * rng.uniform(0.85, 1.15)  # AC-PC or disc-parallel angulation
    affine = series_affine(plan.plane, centre, (ni, nj, nk), (d, d, thick), tilt_deg=tilt,
                           twist_deg=rng.uniform(-2.0, 2.0))
    return affine, (ni, nj, nk)
