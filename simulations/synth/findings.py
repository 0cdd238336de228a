"""Drawing a study's findings: which abnormalities, where, how large.

Prevalences come from the site profile; white-matter hyperintensities become
likelier and more numerous with age, disc herniations peak in middle age.
Each finding carries what the anatomy needs to paint it (centre, radii) and
what the report needs to describe it (location, size, grade).
"""

from __future__ import annotations

import numpy as np

from fedmri.simulations.synth.anatomy import Finding
from fedmri.simulations.synth.brain import LOBES, atrophy_factor
from fedmri.simulations.synth.sites import SiteProfile

# Depth (mm) of each lobe centre below the brain surface: bounds a mass's radius.
_LOBE_DEPTH = {"frontal lobe": 38.0, "parietal lobe": 32.0, "temporal lobe": 22.0, "occipital lobe": 26.0,
               "basal ganglia": 40.0, "centrum semiovale": 36.0}
# Infarct sites: MNI centre (right side), radius range, arterial territory for the report.
_INFARCTS = {
    "frontal lobe": ((44.0, 18.0, 26.0), (9.0, 17.0), "middle cerebral artery"),
    "parietal lobe": ((42.0, -46.0, 38.0), (9.0, 16.0), "middle cerebral artery"),
    "temporal lobe": ((52.0, -24.0, -4.0), (8.0, 14.0), "middle cerebral artery"),
    "occipital lobe": ((18.0, -86.0, 8.0), (8.0, 13.0), "posterior cerebral artery"),
    "basal ganglia": ((22.0, 4.0, 2.0), (4.0, 7.0), "lenticulostriate"),
}
_LEVELS = ("L3-L4", "L4-L5", "L5-S1")
_LEVEL_P = (0.15, 0.5, 0.35)


def _side(rng: np.random.Generator) -> tuple[str, float]:
    return ("right", 1.0) if rng.random() < 0.5 else ("left", -1.0)


def brain_findings(site: SiteProfile, age: float, wm_points: np.ndarray, rng: np.random.Generator) -> list[Finding]:
    """Mass, acute infarct and white-matter hyperintensities for one brain study."""
    out = []
    if rng.random() < site.prevalence["mass"]:
        lobe = str(rng.choice([k for k in LOBES if k != "centrum semiovale"]))
        side, sx = _side(rng)
        r0 = rng.uniform(8.0, min(20.0, _LOBE_DEPTH[lobe] - 6.0))
        radii = tuple(float(r0 * rng.uniform(0.8, 1.15)) for _ in range(3))
        c = np.array(LOBES[lobe]) * (sx, 1.0, 1.0) + rng.uniform(-4.0, 4.0, 3)
        necrotic = r0 > 12.0
        out.append(Finding("mass", f"{side} {lobe}", tuple(sorted((2 * r for r in radii), reverse=True)),
                           {"centre": tuple(c.tolist()), "radii": radii, "necrotic": bool(necrotic),
                            "edema_scale": float(rng.uniform(1.5, 2.2)), "side": side, "lobe": lobe}))
    p_infarct = site.prevalence["infarct"] * (0.4 + 0.9 * atrophy_factor(age))
    if rng.random() < p_infarct:
        where = str(rng.choice(list(_INFARCTS)))
        centre, (rlo, rhi), territory = _INFARCTS[where]
        side, sx = _side(rng)
        r0 = rng.uniform(rlo, rhi)
        radii = tuple(float(r0 * rng.uniform(0.75, 1.2)) for _ in range(3))
        c = np.array(centre) * (sx, 1.0, 1.0) + rng.uniform(-3.0, 3.0, 3)
        out.append(Finding("infarct", f"{side} {where}", tuple(sorted((2 * r for r in radii), reverse=True)),
                           {"centre": tuple(c.tolist()), "radii": radii, "territory": territory, "side": side,
                            "lacunar": where == "basal ganglia"}))
    a = atrophy_factor(age)
    # Age makes WMH likelier and more numerous, but they occur at any age (small-vessel disease, migraine,
    # demyelination), so the label is not a proxy for atrophy.
    if rng.random() < min(0.95, site.prevalence["wmh"] * (0.2 + 0.9 * a**1.5)):
        n = int(3 + rng.poisson(2.0 + 10.0 * a**2))
        centres = wm_points[rng.choice(len(wm_points), size=min(n, len(wm_points)), replace=False)]
        # 8-16 mm across: Fazekas-grade foci and early confluence, visible at a 3 mm grid (punctate
        # 2-3 mm foci vanish in a 3 mm voxel and no label could be learnt from them).
        radii = rng.uniform(4.0, 8.0, size=(len(centres), 3))
        grade = "mild" if n <= 5 else "moderate" if n <= 11 else "severe"
        out.append(Finding("wmh", "periventricular and deep white matter", None,
                           {"centres": centres.tolist(), "radii": radii.tolist(), "count": n, "grade": grade}))
    return out


def knee_findings(site: SiteProfile, age: float, rng: np.random.Generator) -> list[Finding]:
    """Joint effusion for one knee study."""
    if rng.random() >= site.prevalence["effusion"]:
        return []
    s = float(rng.uniform(0.6, 1.2))
    grade = "small" if s < 0.8 else "moderate" if s < 1.0 else "large"
    return [Finding("effusion", "suprapatellar recess", (round(14.0 * s, 1),), {"severity": s, "grade": grade})]


def spine_findings(site: SiteProfile, age: float, rng: np.random.Generator) -> list[Finding]:
    """Disc herniation for one lumbar spine study; likeliest in middle age."""
    p = site.prevalence["disc_herniation"] * float(np.exp(-(((age - 48.0) / 22.0) ** 2)) * 0.6 + 0.5)
    if rng.random() >= p:
        return []
    level = str(rng.choice(_LEVELS, p=_LEVEL_P))
    side, x = {0: ("central", 0.0), 1: ("left paracentral", -7.0), 2: ("right paracentral", 7.0)}[int(rng.integers(3))]
    depth = float(rng.uniform(3.0, 9.0))
    kind = "protrusion" if depth < 6.0 else "extrusion"
    migration = float(rng.uniform(0.0, 4.0)) if kind == "extrusion" else 0.0
    return [Finding("disc_herniation", level, (round(depth, 1),),
                    {"level": level, "x": x, "depth_mm": depth, "side": side, "kind": kind, "migration_mm": migration})]
