"""A parametric lumbar spine, L1 to S1, in a torso.

Frame in millimetres: +x the patient's right, +y anterior, +z superior, L3 at
z ~ 0. Vertebral bodies (cortex and red marrow) alternate with discs (annulus
around a nucleus pulposus) along a lordotic curve; behind them the spinal
canal holds CSF, epidural fat and the cord down to the conus at L1-L2; the
neural arch and spinous process close the canal; erector spinae and psoas
muscles, viscera and subcutaneous fat fill the torso. A disc herniation
pushes nucleus material posteriorly into the canal.
"""

from __future__ import annotations

import numpy as np

from fedmri.simulations.synth.anatomy import Anatomy, Finding, Pose
from fedmri.simulations.synth.shapes import Canvas, Shape, box, cylinder, ellipsoid, inside_ellipse, intersect, union
from fedmri.simulations.synth.tissues import TISSUES, Tissue

VERTEBRAE = ("L1", "L2", "L3", "L4", "L5", "S1")
DISC_LEVELS = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:], strict=True))
_CANAL_BACK = 25.0  # canal centre lies this far behind the body centre line
_LORDOSIS_MM = 20.0  # sagitta of the lumbar curve
_LONG = (-400.0, 400.0)
_TORSO_XY, _TORSO_R = (0.0, 12.0), (150.0, 112.0)  # skin outline of the trunk
_TISSUES = ("skin", "fat", "viscera", "muscle", "bone", "red_marrow", "csf", "cord", "annulus", "nucleus", "herniation")


def lordosis(z: np.ndarray) -> np.ndarray:
    """Anterior offset (mm) of the body centre line at height z: apex near L3-L4, ends tipped back."""
    return (_LORDOSIS_MM * (1.0 - (z / 130.0) ** 2) - _LORDOSIS_MM / 2.0).astype(np.float32)


def _canal(z: np.ndarray) -> np.ndarray:
    return lordosis(z) - _CANAL_BACK


class SpineAnatomy(Anatomy):
    """One patient's lumbar spine.

    Args:
        pose: placement in the scanner (scale = body size).
        age: years; discs lose height and water, marrow turns fattier with age.
        fat_mm: subcutaneous fat thickness of the back and abdomen.
        findings: "disc_herniation" findings (attrs: level, x, depth_mm).
    """

    region = "spine"

    def __init__(self, pose: Pose, age: float, fat_mm: float, findings: tuple[Finding, ...] = ()) -> None:
        self.pose, self.age, self.fat_mm, self.findings = pose, age, fat_mm, findings
        for f in findings:
            if f.code != "disc_herniation":
                raise ValueError(f"spine cannot show finding {f.code!r}")
        self.degeneration = float(np.clip((age - 25.0) / 60.0, 0.0, 1.0))
        disc_h = np.array([9.0, 10.0, 10.5, 11.0, 10.0]) * (1.0 - 0.22 * self.degeneration)
        body_h = np.array([26.0, 27.0, 28.0, 28.0, 27.0, 30.0])
        heights = np.empty(11)
        heights[0::2], heights[1::2] = body_h, disc_h
        tops = 95.0 - np.concatenate([[0.0], np.cumsum(heights)[:-1]])
        self.bodies = [(float(t - h), float(t)) for t, h in zip(tops[0::2], body_h, strict=True)]  # (z_lo, z_hi)
        self.discs = {lvl: (float(t - h), float(t)) for lvl, t, h in zip(DISC_LEVELS, tops[1::2], disc_h, strict=True)}

    @property
    def centre_local(self) -> np.ndarray:
        return np.array([0.0, -12.0, -5.0])

    def disc_centre(self, level: str) -> np.ndarray:
        """(3,) local centre of a disc (axial slices are centred on the lower discs)."""
        lo, hi = self.discs[level]
        z = 0.5 * (lo + hi)
        return np.array([0.0, float(lordosis(np.float32(z))), z])

    def tissues(self) -> dict[str, Tissue]:
        t = dict(TISSUES)
        a = self.degeneration
        t["nucleus"] = t["nucleus"].with_(t2=115.0 - 55.0 * a)  # desiccation darkens discs on T2
        t["red_marrow"] = t["red_marrow"].with_(t1_15=620.0 - 220.0 * a, t1_3=820.0 - 280.0 * a)  # fattier marrow
        return t

    def support(self, pts: np.ndarray) -> np.ndarray:
        return inside_ellipse(pts, _TORSO_XY, _TORSO_R)

    def local_fractions(self, pts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        cv = Canvas(pts, _TISSUES)
        ext = _LORDOSIS_MM
        torso = cylinder(_TORSO_XY, _TORSO_R, _LONG)
        cv.paint("skin", torso)
        cv.paint("fat", torso.grown(-1.5))
        cv.paint("viscera", torso.grown(-1.5 - self.fat_mm))
        for side in (-1.0, 1.0):
            cv.paint("muscle", cylinder((side * 27.0, -_CANAL_BACK - 20.0), (21.0, 22.0), _LONG, _canal, ext))
            cv.paint("muscle", cylinder((side * 33.0, 2.0), (13.0, 13.0), (-110.0, 60.0), lordosis, ext))  # psoas
        for lo, hi in self.bodies:  # neural arch (posterior half ring) and spinous process of each level
            arch = cylinder((0.0, -_CANAL_BACK), (20.0, 17.0), (lo + 3.0, hi - 1.0), _canal, ext)
            arch = intersect(arch, Shape(lambda p: p[:, 1] - _canal(p[:, 2])))
            spinous = box((0.0, -_CANAL_BACK - 31.0, 0.5 * (lo + hi) - 4.0), (4.0, 19.0, 10.0))
            shifted = Shape(lambda p, s=spinous: s.sdf(p - np.stack([0 * p[:, 0], lordosis(p[:, 2]), 0 * p[:, 0]], 1)),
                            (np.subtract(spinous.box[0], (0, ext, 0)), np.add(spinous.box[1], (0, ext, 0))))
            bone = union(arch, shifted)
            cv.paint("bone", bone)
            cv.paint("red_marrow", bone.grown(-1.5))
        cv.paint("fat", cylinder((0.0, -_CANAL_BACK), (13.0, 10.5), _LONG, lordosis, ext))  # epidural fat
        cv.paint("csf", cylinder((0.0, -_CANAL_BACK), (11.0, 8.0), _LONG, lordosis, ext))
        conus = self.discs["L1-L2"][0]
        cv.paint("cord", cylinder((0.0, 1.0 - _CANAL_BACK), (4.5, 4.0), (conus, 400.0), lordosis, ext))
        for lo, hi in self.bodies:
            body = cylinder((0.0, 0.0), (22.0, 16.0), (lo, hi), lordosis, ext)
            cv.paint("bone", body)
            cv.paint("red_marrow", body.grown(-1.2))
        for lo, hi in self.discs.values():
            cv.paint("annulus", cylinder((0.0, 0.0), (22.5, 16.5), (lo, hi), lordosis, ext))
            cv.paint("nucleus", cylinder((0.0, -1.0), (13.0, 8.5), (lo + 1.5, hi - 1.5), lordosis, ext), soft=2.0)
        for f in self.findings:
            lo, hi = self.discs[f.attrs["level"]]
            c = self.disc_centre(f.attrs["level"])
            depth = float(f.attrs["depth_mm"])
            centre = (f.attrs["x"], c[1] - 16.5 - depth / 2.0 + 1.0, c[2] - f.attrs.get("migration_mm", 0.0))
            blob = ellipsoid(centre, (7.0, depth / 2.0 + 1.0, 0.5 * (hi - lo) + 1.0))
            cv.paint("herniation", blob, {"csf": 1.0, "fat": 1.0, "cord": 1.0})
        f = cv.fractions()
        return f, ({"disc_herniation": f["herniation"]} if "herniation" in f else {})
