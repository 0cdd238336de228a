"""Imaging protocols: which series a study gets, and each series' timing and tags.

Brain: T1, T2, FLAIR, DWI with its ADC map, and T1 after gadolinium when
contrast is given. Knee: fat-saturated PD, fat-saturated T2, T1. Lumbar spine:
sagittal T1 and T2, axial T2. Timing parameters are drawn from ranges typical
for the field strength, written into the DICOM tags that sequence
classification reads (EchoTime, RepetitionTime, InversionTime,
DiffusionBValue, ScanningSequence, SequenceVariant, ScanOptions,
ContrastBolusAgent), and the series is named in the vendor's style.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmri.simulations.synth.contrast import Acquisition, flair_null_ti
from fedmri.simulations.synth.sites import SiteProfile
from fedmri.simulations.synth.tissues import TISSUES


@dataclass(frozen=True)
class SeriesPlan:
    """One series of a study before it is rendered.

    Attributes:
        family: T1, T1post, T2, FLAIR, PD, DWI or ADC (the ground truth).
        plane: nominal plane: axial, sagittal or coronal.
        fat_sat: spectral fat suppression.
        priority: lower is kept first when a study must lose series to fit the site's count.
    """

    family: str
    plane: str
    fat_sat: bool = False
    priority: int = 0


def study_protocol(region: str, site: SiteProfile, contrast: bool, rng: np.random.Generator) -> list[SeriesPlan]:
    """Full series list of a study of ``region`` at ``site``, in acquisition order.

    Some series are optional, as in real practice: a non-contrast brain study
    skips the T1 about half the time, a knee study sometimes skips the T1.
    """
    p = site.plane
    if region == "brain":
        plans = []
        if contrast or rng.random() < 0.5:  # a post-contrast T1 always comes with its pre-contrast T1
            plans.append(SeriesPlan("T1", p("brain", "T1", "sagittal"), priority=4))
        plans += [SeriesPlan("T2", p("brain", "T2", "axial"), priority=2),
                  SeriesPlan("FLAIR", p("brain", "FLAIR", "axial"), priority=1),
                  SeriesPlan("DWI", "axial", priority=3)]
        if site.adc_series:
            plans.append(SeriesPlan("ADC", "axial", priority=6))
        if contrast:
            plans.append(SeriesPlan("T1post", "axial", priority=2))
        return plans
    if region == "knee":
        plans = [SeriesPlan("PD", p("knee", "PD", "sagittal"), fat_sat=True, priority=1),
                 SeriesPlan("T2", p("knee", "T2", "axial"), fat_sat=True, priority=2)]
        if rng.random() < 0.7:
            plans.append(SeriesPlan("T1", p("knee", "T1", "coronal"), priority=3))
        return plans
    if region == "spine":
        return [SeriesPlan("T1", "sagittal", priority=2), SeriesPlan("T2", "sagittal", priority=1),
                SeriesPlan("T2", "axial", priority=3)]
    raise ValueError(f"unknown region {region!r}")


def trim_protocol(plans: list[SeriesPlan], n: int) -> list[SeriesPlan]:
    """Keep the ``n`` highest-priority series, in acquisition order (a shortened exam)."""
    if n >= len(plans):
        return list(plans)
    keep = sorted(range(len(plans)), key=lambda i: (plans[i].priority, i))[:n]
    return [plans[i] for i in sorted(keep)]


def acquisition(plan: SeriesPlan, region: str, site: SiteProfile, rng: np.random.Generator) -> Acquisition:
    """Draw TR/TE/TI/flip/b for one series, plausible for the site's field strength."""
    u = rng.uniform
    b0 = site.field_strength
    fam = plan.family
    if fam in ("T1", "T1post"):
        post = fam == "T1post"
        if region == "brain" and site.brain_t1 == "gre":
            return Acquisition(fam, "GR", tr=u(7.0, 11.0), te=u(2.5, 4.5), flip=u(10.0, 15.0), contrast=post)
        return Acquisition(fam, "SE", tr=u(420.0, 650.0), te=u(8.0, 15.0), contrast=post)
    if fam == "T2":
        te = u(55.0, 75.0) if plan.fat_sat else u(85.0, 115.0)
        return Acquisition(fam, "SE", tr=u(3000.0, 5500.0), te=te, fat_sat=plan.fat_sat)
    if fam == "PD":
        return Acquisition(fam, "SE", tr=u(2200.0, 3600.0), te=u(20.0, 38.0), fat_sat=plan.fat_sat)
    if fam == "FLAIR":
        tr = u(8000.0, 10000.0) if b0 < 2.0 else u(9000.0, 11000.0)
        ti = flair_null_ti(tr, TISSUES["csf"].t1(b0)) * u(0.98, 1.02)  # tuned to null CSF
        return Acquisition(fam, "IR", tr=tr, te=u(90.0, 130.0), ti=ti)
    if fam in ("DWI", "ADC"):
        te = u(85.0, 105.0) if b0 < 2.0 else u(60.0, 85.0)
        return Acquisition(fam, "EP", tr=u(4000.0, 7000.0), te=te, b=1000.0, fat_sat=True)
    raise ValueError(f"unknown sequence family {fam!r}")


def acquisition_tags(acq: Acquisition, site: SiteProfile) -> dict[str, Any]:
    """DICOM tags that describe the acquisition (what a tag-based sequence classifier reads)."""
    scanning = {"SE": "SE", "IR": ["SE", "IR"], "GR": "GR", "EP": ["EP", "SE"]}[acq.kind]
    variant = {"SE": "SK" if acq.family in ("T2", "PD") else "SP", "IR": "SK", "GR": ["SP", "SS"], "EP": ["SK", "SP"]}
    tags: dict[str, Any] = {
        "ScanningSequence": scanning,
        "SequenceVariant": variant[acq.kind],
        "MRAcquisitionType": "3D" if acq.kind == "GR" else "2D",
        "RepetitionTime": round(acq.tr, 2),
        "EchoTime": round(acq.te, 2),
        "FlipAngle": round(acq.flip, 1),
        "MagneticFieldStrength": site.field_strength,
        "ImagingFrequency": round(42.577478 * site.field_strength, 6),
        # IS values as strings: the DICOM writer validates IS strictly and refuses Python ints.
        "EchoTrainLength": str({"SE": 16 if acq.family in ("T2", "PD") else 3, "IR": 20, "GR": 1, "EP": 1}[acq.kind]),
    }
    if acq.fat_sat and acq.kind != "EP":
        tags["ScanOptions"] = "FS"
    if acq.ti is not None:
        tags["InversionTime"] = round(acq.ti, 1)
    if acq.b is not None:
        tags["DiffusionBValue"] = acq.b
        tags["ImageType"] = (["DERIVED", "PRIMARY", "DIFFUSION", "ADC"] if acq.family == "ADC"
                             else ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"])
    if acq.contrast:
        tags["ContrastBolusAgent"] = {"siemens": "Gadovist", "ge": "GADAVIST", "philips": "Dotarem",
                                      "canon": "Gadoterate"}.get(site.vendor, "Gadobutrol")
        tags["ContrastBolusRoute"] = "IV"
    return tags
