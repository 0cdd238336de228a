"""A parametric knee: distal femur, proximal tibia, fibular head and patella.

Frame of a right knee in millimetres: +x lateral, +y anterior, +z superior,
joint line at z = 0 (a left knee is mirrored by its pose). Bones have a
cortical shell around fatty marrow; articular cartilage covers the condyles,
the tibial plateau and the back of the patella; menisci and tendons are dark;
Hoffa's and the prefemoral fat pads sit in front; muscle and subcutaneous fat
wrap it all. An effusion distends the suprapatellar recess with fluid.
"""

from __future__ import annotations

import numpy as np

from fedmri.simulations.synth.anatomy import Anatomy, Finding, Pose
from fedmri.simulations.synth.shapes import (Canvas, Shape, capsule, cylinder, ellipsoid, inside_ellipse, intersect,
                                                   union)
from fedmri.simulations.synth.tissues import TISSUES, Tissue

_LONG = (-400.0, 400.0)  # "infinite" along the limb
_LIMB_XY, _LIMB_R = (0.0, 2.0), (58.0, 52.0)  # skin outline of the leg
_CONDYLES = (ellipsoid((0.0, -5.0, 38.0), (30.0, 22.0, 26.0)),
             ellipsoid((20.0, -6.0, 17.0), (17.0, 25.0, 18.0)),
             ellipsoid((-20.0, -6.0, 17.0), (18.0, 25.0, 18.0)))
_FEMUR = union(cylinder((0.0, -5.0), (14.0, 14.0), (30.0, 400.0)), *_CONDYLES)
_TIBIA = union(cylinder((0.0, -5.0), (38.0, 27.0), (-40.0, -7.0)),
               ellipsoid((0.0, -5.0, -42.0), (30.0, 23.0, 22.0)),
               cylinder((0.0, -3.0), (16.0, 15.0), (-400.0, -40.0)))
_FIBULA = union(ellipsoid((31.0, -22.0, -42.0), (9.0, 9.0, 13.0)), cylinder((31.0, -24.0), (7.0, 7.0), (-400.0, -45.0)))
_PATELLA = ellipsoid((0.0, 33.0, 24.0), (21.0, 8.0, 19.0))
_BONES = ((_FEMUR, 1.6), (_TIBIA, 1.6), (_FIBULA, 1.2), (_PATELLA, 1.2))
_TISSUES = ("skin", "fat", "muscle", "tendon", "effusion", "fluid", "cartilage", "bone", "yellow_marrow")


class KneeAnatomy(Anatomy):
    """One patient's knee.

    Args:
        pose: placement in the scanner (scale = knee size; mirrored for a left knee).
        age: years; cartilage thins and its T2 shortens with age.
        fat_mm: subcutaneous fat thickness (women carry more).
        findings: an "effusion" finding (attrs: severity 0.6-1.2).
    """

    region = "knee"

    def __init__(self, pose: Pose, age: float, fat_mm: float, findings: tuple[Finding, ...] = ()) -> None:
        self.pose, self.age, self.fat_mm, self.findings = pose, age, fat_mm, findings
        for f in findings:
            if f.code != "effusion":
                raise ValueError(f"knee cannot show finding {f.code!r}")
        self.cartilage_mm = float(np.clip(2.8 - 0.015 * max(age - 30.0, 0.0), 1.4, 2.8))

    @property
    def centre_local(self) -> np.ndarray:
        return np.array([0.0, 2.0, 8.0])

    def tissues(self) -> dict[str, Tissue]:
        t = dict(TISSUES)
        # Cartilage loses water and collagen order with age: shorter T2, darker on fluid-sensitive images.
        t["cartilage"] = t["cartilage"].with_(t2=40.0 - 0.12 * max(self.age - 30.0, 0.0))
        return t

    def support(self, pts: np.ndarray) -> np.ndarray:
        return inside_ellipse(pts, _LIMB_XY, _LIMB_R)

    def local_fractions(self, pts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        cv = Canvas(pts, _TISSUES)
        limb = cylinder(_LIMB_XY, _LIMB_R, _LONG)
        cv.paint("skin", limb)
        cv.paint("fat", limb.grown(-1.5))
        cv.paint("muscle", limb.grown(-1.5 - self.fat_mm))
        # Anterior fat pads: Hoffa's below the patella, prefemoral above it; then the two tendons.
        cv.paint("fat", ellipsoid((0.0, 22.0, -6.0), (26.0, 13.0, 13.0)))
        cv.paint("fat", ellipsoid((0.0, 17.0, 50.0), (24.0, 9.0, 26.0)))
        cv.paint("tendon", capsule((0.0, 35.0, 6.0), (0.0, 22.0, -48.0), 3.5))
        cv.paint("tendon", capsule((0.0, 35.0, 42.0), (0.0, 26.0, 95.0), 4.0))
        for f in self.findings:
            s = float(f.attrs["severity"])
            pouch = ellipsoid((0.0, 23.0, 46.0), (26.0 * s, 7.0 * s, 24.0 * s))  # the suprapatellar recess
            cv.paint("effusion", pouch, {"fat": 1.0, "muscle": 1.0})
        # A film of joint fluid, then the menisci: a ring at the periphery of the plateau.
        cv.paint("fluid", cylinder((0.0, -5.0), (40.0, 29.0), (-6.0, -2.0)))
        inner = cylinder((0.0, -5.0), (26.0, 17.0), (-6.0, 2.0))
        cv.paint("tendon", intersect(cylinder((0.0, -5.0), (37.0, 26.0), (-5.0, 1.0)), Shape(lambda p: -inner.sdf(p))))
        c = self.cartilage_mm
        distal = np.clip((32.0 - pts[:, 2]) / 2.0 + 0.5, 0.0, 1.0)  # femoral cartilage covers the distal end only
        cv.paint("cartilage", union(*_CONDYLES).grown(c), weight=distal)
        cv.paint("cartilage", cylinder((0.0, -5.0), (36.0, 25.0), (-7.0, -7.0 + c)))
        cv.paint("cartilage", ellipsoid((0.0, 33.0 - c, 24.0), (19.0, 8.0, 16.0)))
        for bone, cortex in _BONES:
            cv.paint("bone", bone)
            cv.paint("yellow_marrow", bone.grown(-cortex))
        f = cv.fractions()
        # Ground truth is what is left of the effusion after cartilage and bone were laid over it.
        return f, ({"effusion": f["effusion"]} if "effusion" in f else {})
