"""Relaxation and diffusion properties of every tissue the phantoms use.

Values are typical literature figures (e.g. Stanisz et al., MRM 2005; Gold et
al., AJR 2004; Bojorquez et al., MRI 2017) rounded: T1 depends on field
strength (longer at 3 T), T2 barely does. ``gd`` is the extra longitudinal
relaxation rate (1/s) that gadolinium adds in that tissue after injection:
zero behind an intact blood-brain barrier, high in an enhancing tumour rim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tissue:
    """MR properties of one tissue.

    Attributes:
        t1_15: T1 at 1.5 T (ms).
        t1_3: T1 at 3 T (ms).
        t2: T2 (ms); fast-spin-echo apparent values for fat.
        pd: proton density relative to CSF.
        adc: apparent diffusion coefficient (1e-3 mm^2/s).
        gd: gadolinium-induced R1 increase after contrast (1/s).
        fat: whether fat suppression removes this tissue's signal.
    """

    t1_15: float
    t1_3: float
    t2: float
    pd: float
    adc: float
    gd: float = 0.0
    fat: bool = False

    def t1(self, field_strength: float) -> float:
        """T1 (ms) at ``field_strength`` tesla, interpolated linearly between 1.5 and 3 T."""
        w = min(max((field_strength - 1.5) / 1.5, 0.0), 1.0)
        return (1.0 - w) * self.t1_15 + w * self.t1_3

    def with_(self, **changes: float) -> Tissue:
        """A copy with some properties changed (age effects, per-patient variation)."""
        return replace(self, **changes)


TISSUES: dict[str, Tissue] = {
    # brain
    "wm": Tissue(790, 1080, 72, 0.69, 0.75),
    "gm": Tissue(1150, 1600, 95, 0.80, 0.85),
    "csf": Tissue(4000, 4300, 1800, 1.00, 3.0),
    # shared soft tissues
    "fat": Tissue(290, 380, 120, 0.90, 0.02, fat=True),
    "muscle": Tissue(1000, 1400, 40, 0.75, 1.5, gd=0.5),
    "bone": Tissue(1000, 1000, 1.0, 0.05, 0.1),
    "yellow_marrow": Tissue(300, 390, 110, 0.90, 0.02, fat=True),
    "red_marrow": Tissue(600, 800, 60, 0.80, 0.5, gd=0.3),
    "skin": Tissue(800, 1100, 45, 0.70, 1.0, gd=0.3),
    "viscera": Tissue(700, 900, 50, 0.80, 1.5, gd=0.8),
    # knee
    "cartilage": Tissue(950, 1200, 40, 0.75, 1.3),
    "fluid": Tissue(3000, 3500, 700, 0.95, 2.8),
    "effusion": Tissue(3000, 3500, 700, 0.95, 2.8),
    "tendon": Tissue(600, 800, 5, 0.20, 0.5),
    # spine
    "nucleus": Tissue(1100, 1300, 110, 0.85, 1.8),
    "annulus": Tissue(900, 1100, 45, 0.70, 1.0),
    "cord": Tissue(750, 900, 75, 0.70, 1.0),
    # lesions
    "tumour": Tissue(1100, 1400, 120, 0.85, 1.1, gd=1.5),
    "tumour_rim": Tissue(1100, 1400, 110, 0.85, 1.0, gd=5.0),
    "necrosis": Tissue(2500, 2900, 400, 0.95, 2.2),
    "edema": Tissue(1000, 1300, 140, 0.85, 1.4),
    "wmh": Tissue(1000, 1300, 120, 0.78, 1.0),
    "infarct": Tissue(1000, 1300, 110, 0.85, 0.4),
    "herniation": Tissue(1000, 1200, 70, 0.80, 1.4),
}
