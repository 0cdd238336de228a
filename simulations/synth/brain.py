"""A patient's brain: the MNI template with age, sex and lesions applied.

Age enlarges the ventricles, thins the cortex into wider sulci and widens the
extra-axial CSF (atrophy); sex sets the head size through the pose scale
(men ~7% larger linearly). Skull and scalp are layered outward from the brain
surface. Lesions are painted in MNI millimetres.
"""

from __future__ import annotations

import numpy as np

from fedmri.simulations.synth.anatomy import Anatomy, Finding, Pose
from fedmri.simulations.synth.brain_atlas import MAP_NAMES, BrainAtlas, trilinear
from fedmri.simulations.synth.grid import affine_resample, voxel_points
from fedmri.simulations.synth.shapes import Canvas, ellipsoid

# Named MNI centres (mm, RAS: +x is the patient's right) for masses and infarcts.
LOBES = {
    "frontal lobe": (30.0, 28.0, 28.0),
    "parietal lobe": (32.0, -48.0, 40.0),
    "temporal lobe": (44.0, -18.0, -12.0),
    "occipital lobe": (24.0, -78.0, 8.0),
    "basal ganglia": (22.0, 4.0, 2.0),
    "centrum semiovale": (24.0, -10.0, 34.0),
}
# Skull and scalp layers outward from the extra-axial CSF, (tissue, thickness mm).
_HEAD_LAYERS = (("bone", 1.8), ("yellow_marrow", 2.5), ("bone", 1.8), ("fat", 4.5), ("skin", 1.5))
_TISSUES = ("gm", "wm", "csf", "bone", "yellow_marrow", "fat", "skin",
            "edema", "wmh", "infarct", "tumour_rim", "tumour", "necrosis")
# Which painted tissues make up each finding's ground-truth mask (oedema is not the mass).
_LESION_TISSUES = {"mass": ("tumour_rim", "tumour", "necrosis"), "wmh": ("wmh",), "infarct": ("infarct",)}


def atrophy_factor(age: float) -> float:
    """0 up to age 25, rising to 1 at 90: how far along age-related volume loss is."""
    return float(np.clip((age - 25.0) / 65.0, 0.0, 1.0))


class BrainAnatomy(Anatomy):
    """One patient's head.

    Args:
        atlas: the prepared MNI maps.
        pose: placement in the scanner; ``pose.scale`` carries the head size.
        age: years.
        findings: lesions to paint (codes mass, wmh, infarct).
        atrophy_jitter: individual deviation of atrophy from the age trend.
    """

    region = "brain"

    def __init__(self, atlas: BrainAtlas, pose: Pose, age: float, findings: tuple[Finding, ...] = (),
                 atrophy_jitter: float = 0.0) -> None:
        self.atlas, self.pose, self.age, self.findings = atlas, pose, age, findings
        self.atrophy = float(np.clip(atrophy_factor(age) + atrophy_jitter, 0.0, 1.2))
        self._maps: np.ndarray | None = None

    @property
    def centre_local(self) -> np.ndarray:
        return np.array([0.0, -18.0, 12.0])

    def _patient_maps(self) -> np.ndarray:
        """This patient's gm, wm, csf, dout (X, Y, Z, 4) on the atlas grid with atrophy applied (cached).

        Applying age effects once per patient on the grid, instead of per
        series on the samples, leaves 4 maps to interpolate instead of 6.
        """
        if self._maps is None:
            m = {name: self.atlas.maps[..., c] for c, name in enumerate(MAP_NAMES)}
            a = np.float32(self.atrophy)
            # Ventricles grow by up to ~4 mm all round; sulci widen where GM borders CSF.
            grow = np.clip(4.0 * a**1.5 - m["vdist"] + 0.5, 0.0, 1.0) * (m["vdist"] < 6.0)
            gm_loss = np.maximum(grow, np.float32(0.45) * a * np.clip(2.5 * m["prox"], 0.0, 1.0))
            gm, wm = m["gm"], m["wm"]
            maps = (gm * (1.0 - gm_loss), wm * (1.0 - grow), m["csf"] + gm * gm_loss + wm * grow, m["dout"])
            self._maps = np.stack(maps, axis=-1).astype(np.float32)
        return self._maps

    def local_fractions(self, pts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        m = trilinear(self._patient_maps(), self.atlas.affine, pts)  # N, 4
        return self._fractions([np.ascontiguousarray(m[:, c]) for c in range(4)], pts)

    def sample_grid(self, affine: np.ndarray, shape: tuple[int, int, int],
                    n_sub: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        # The series grid is an affine image of the atlas grid, so it is resampled without
        # coordinate arrays (~3x faster than sampling points), and only
        # over the part of the grid the head can reach (a field of view is ~40% air).
        vox_from_world = np.linalg.inv(self.atlas.affine) @ self.pose.local_from_world()
        tissues: dict[str, np.ndarray] = {}
        lesions: dict[str, np.ndarray] = {}
        for o in (np.arange(n_sub) + 0.5) / n_sub - 0.5:
            a_s = affine.copy()
            a_s[:3, 3] += o * affine[:3, 2]
            box = self._head_box(a_s, shape)
            if box is None:
                continue
            start = np.array([b.start for b in box])
            crop = tuple(b.stop - b.start for b in box)
            a_c = a_s.copy()
            a_c[:3, 3] = a_s[:3, :3] @ start + a_s[:3, 3]
            m = vox_from_world @ a_c
            maps = list(affine_resample(self._patient_maps(), m, crop))
            pts = self.pose.to_local(voxel_points(a_c, crop)[0]) if self.findings else None
            t, les = self._fractions(maps, pts)
            for acc, new in ((tissues, t), (lesions, les)):
                for name, frac in new.items():
                    if name not in acc:
                        acc[name] = np.zeros(shape, dtype=np.float32)
                    acc[name][box] += frac.reshape(crop) / n_sub
        return ({k: v.reshape(-1) for k, v in tissues.items()}, {k: v.reshape(-1) for k, v in lesions.items()})

    def _head_box(self, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, slice, slice] | None:
        """Index ranges of a series grid that the head's bounding box reaches (None: it misses)."""
        lo, hi = self.atlas.head_box
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        world = self.pose.to_world(corners)  # 8, 3
        idx = (np.linalg.inv(affine) @ np.c_[world, np.ones(8)].T)[:3].T  # 8, 3
        start = np.clip(np.floor(idx.min(axis=0)) - 1, 0, shape).astype(int)
        stop = np.clip(np.ceil(idx.max(axis=0)) + 2, 0, shape).astype(int)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]

    def _fractions(self, maps: list[np.ndarray], pts: np.ndarray | None) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, np.ndarray]]:
        """Tissues from sampled (gm, wm, csf, dout), then lesions painted at ``pts`` (MNI mm)."""
        gm, wm, csf, dout = maps
        if pts is None:  # nothing to paint: no coordinates needed
            pts = np.broadcast_to(np.zeros(3, np.float32), (len(gm), 3))
        cv = Canvas(pts, _TISSUES)
        cv.add("gm", gm)
        cv.add("wm", wm)
        cv.add("csf", csf)
        self._head_layers(cv, dout, 1.0 - (gm + wm + csf), self.atrophy)
        for f in self.findings:
            self._lesion(cv, f)
        frac = cv.fractions()
        lesions = {}
        for code, parts in _LESION_TISSUES.items():
            present = [frac[t] for t in parts if t in frac]
            if present:
                lesions[code] = np.sum(present, axis=0)
        return frac, lesions

    def _head_layers(self, cv: Canvas, dout: np.ndarray, rest: np.ndarray, a: float) -> None:
        """Split what is not brain into extra-axial CSF, skull, diploe, scalp fat, skin and air."""
        rest = np.clip(rest, 0.0, 1.0)
        edge = 1.2 + 2.0 * a  # extra-axial CSF widens with atrophy
        inside_prev = np.zeros_like(dout)
        for tissue, thickness in (("csf", 0.0),) + _HEAD_LAYERS:
            edge += thickness
            inside = np.clip(edge - dout + 0.5, 0.0, 1.0)  # fraction within `edge` mm of the brain
            cv.add(tissue, (inside - inside_prev) * rest)
            inside_prev = inside

    def _lesion(self, cv: Canvas, f: Finding) -> None:
        """Paint one finding in MNI millimetres."""
        if f.code == "mass":
            c, r = f.attrs["centre"], np.asarray(f.attrs["radii"], dtype=np.float32)
            cv.paint("edema", ellipsoid(c, r * f.attrs["edema_scale"]), {"wm": 1.0})
            cv.paint("tumour_rim", ellipsoid(c, r), {"gm": 1.0, "wm": 1.0, "csf": 1.0, "edema": 1.0, "wmh": 1.0})
            cv.paint("tumour", ellipsoid(c, r - 3.0), {"tumour_rim": 1.0})
            if f.attrs.get("necrotic"):
                cv.paint("necrosis", ellipsoid(c, r * 0.5), {"tumour": 1.0, "tumour_rim": 1.0})
        elif f.code == "wmh":
            for c, r in zip(f.attrs["centres"], f.attrs["radii"], strict=True):
                cv.paint("wmh", ellipsoid(c, r), {"wm": 1.0})
        elif f.code == "infarct":
            cv.paint("infarct", ellipsoid(f.attrs["centre"], f.attrs["radii"]), {"gm": 1.0, "wm": 1.0})
        else:
            raise ValueError(f"brain cannot show finding {f.code!r}")
