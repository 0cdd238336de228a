"""MR signal equations: tissue fractions in, image intensities out.

Each voxel's signal is the fraction-weighted sum of its tissues' signals
(partial volume), each tissue's signal coming from the textbook equations:

* spin echo (SE, and the EPI readout of DWI): ``S = PD (1 - e^{-TR/T1}) e^{-TE/T2}``
* inversion recovery (IR, FLAIR): ``S = PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2}``
* spoiled gradient echo (GR): ``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) e^{-TE/T2}``
* diffusion weighting: ``S = S_T2w e^{-b ADC}``

Gadolinium shortens T1 through ``1/T1' = 1/T1 + gd``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmri.simulations.synth.tissues import Tissue

# What fat suppression leaves of fat signal (spectral fat saturation is imperfect).
FAT_RESIDUAL = 0.08


@dataclass(frozen=True)
class Acquisition:
    """Timing and weighting of one series.

    Attributes:
        family: ground-truth sequence family (T1, T1post, T2, FLAIR, PD, DWI, ADC).
        kind: pulse sequence: "SE", "IR", "GR" (spoiled gradient echo) or "EP" (diffusion EPI).
        tr: repetition time (ms).
        te: echo time (ms).
        ti: inversion time (ms) for IR, else None.
        flip: flip angle (degrees).
        b: diffusion b-value (s/mm^2) for DWI/ADC, else None.
        fat_sat: spectral fat suppression.
        contrast: images taken after gadolinium.
    """

    family: str
    kind: str
    tr: float
    te: float
    ti: float | None = None
    flip: float = 90.0
    b: float | None = None
    fat_sat: bool = False
    contrast: bool = False


def tissue_signal(tissue: Tissue, acq: Acquisition, field_strength: float, b: float = 0.0) -> float:
    """Noise-free signal of a pure voxel of ``tissue`` (arbitrary units, PD-scaled).

    Args:
        tissue: the tissue's properties.
        acq: the series' acquisition parameters.
        field_strength: B0 in tesla (selects T1).
        b: diffusion weighting (s/mm^2) to apply; 0 for none.
    """
    t1 = tissue.t1(field_strength)
    if acq.contrast and tissue.gd > 0:
        t1 = 1000.0 / (1000.0 / t1 + tissue.gd)  # ms; gd is in 1/s
    e1 = math.exp(-acq.tr / t1)
    e2 = math.exp(-acq.te / tissue.t2)
    if acq.kind == "IR":
        assert acq.ti is not None, "inversion recovery needs an inversion time"
        s = abs(1.0 - 2.0 * math.exp(-acq.ti / t1) + e1) * e2
    elif acq.kind == "GR":
        a = math.radians(acq.flip)
        s = math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * e2
    else:  # SE and EP share the spin-echo magnitude
        s = (1.0 - e1) * e2
    s *= tissue.pd * math.exp(-b * tissue.adc * 1e-3)
    if tissue.fat and (acq.fat_sat or acq.kind == "EP"):  # DWI is always fat-suppressed
        s *= FAT_RESIDUAL
    return s


def signal(fractions: Mapping[str, np.ndarray], tissues: Mapping[str, Tissue], acq: Acquisition,
           field_strength: float, b: float = 0.0) -> np.ndarray:
    """Partial-volume image: sum over tissues of fraction x pure-tissue signal.

    Args:
        fractions: tissue name -> fraction array (any shape, all the same).
        tissues: properties for every tissue named in ``fractions``.
        acq: acquisition parameters.
        field_strength: B0 in tesla.
        b: diffusion weighting to apply (s/mm^2).

    Returns:
        float32 array of the fractions' shape.
    """
    out: np.ndarray | None = None
    for name, frac in fractions.items():
        term = frac * np.float32(tissue_signal(tissues[name], acq, field_strength, b))
        out = term if out is None else out + term
    assert out is not None, "no tissues to image"
    return out.astype(np.float32, copy=False)


def flair_null_ti(tr: float, t1_csf: float) -> float:
    """Inversion time (ms) that nulls CSF at this TR: 1 - 2 e^{-TI/T1} + e^{-TR/T1} = 0."""
    return -t1_csf * math.log((1.0 + math.exp(-tr / t1_csf)) / 2.0)


def adc_map(s0: np.ndarray, sb: np.ndarray, b: float, floor: float) -> np.ndarray:
    """ADC in 1e-6 mm^2/s (the unit scanners store) from b=0 and b images.

    Voxels whose b=0 signal is below ``floor`` (air, cortical bone) are set to 0,
    as scanners do, instead of returning noise-driven values.
    """
    ratio = np.maximum(s0, 1e-6) / np.maximum(sb, 1e-6)
    adc = np.log(ratio) / b * 1e6
    adc = np.clip(adc, 0.0, 4000.0)
    adc[s0 < floor] = 0.0
    return adc.astype(np.float32)
