"""Site profiles: what makes one synthetic hospital differ from another.

Real federations are not IID: hospitals run different vendors and field
strengths, write different series names, scale intensities differently,
acquire at different resolutions and planes, and see different patients.
Site k takes archetype ``(k - 1) % len(ARCHETYPES)`` and jitters its numbers
with its own seed, so any number of sites can be made and none is a copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless


@dataclass(frozen=True)
class SiteProfile:
    """Everything that characterises one hospital's MRI department.

    Attributes:
        vendor: short vendor key for series naming ("siemens", "ge", "philips", "canon").
        manufacturer: DICOM Manufacturer.
        model: DICOM ManufacturerModelName.
        field_strength: B0 in tesla (1.5 or 3.0).
        institution: DICOM InstitutionName (synthetic).
        body_part_tag: whether the scanner fills BodyPartExamined (one archetype leaves it empty).
        region_mix: share of studies per body region (case mix).
        prevalence: probability of each finding in a study of its region
            ("wmh" scales an age-driven probability).
        contrast_rate: share of brain studies without a mass that still get gadolinium.
        age_mean, age_sd: patient age distribution (years).
        male_fraction: share of male patients.
        snr: nominal signal-to-noise at 1.5 T and a 16 mm^3 voxel.
        bias: strength of the receive-coil bias field.
        level: the vendor's stored intensity for bright tissue.
        inplane_pos, slice_pos: where in the preset's resolution ranges this site sits (0 fine, 1 coarse).
        brain_t1: "se" (2D spin echo) or "gre" (3D spoiled gradient echo) for brain T1.
        planes: acquisition plane per (region, family) where sites differ.
        oblique_deg: angulation of axial slabs (>15 degrees reads as oblique).
        adc_series: whether the scanner stores the ADC map as its own series.
        second_study_rate: share of patients with a second study.
        id_prefix: prefix of patient IDs and accession numbers.
        enhanced: the PACS exports one multi-frame Enhanced MR file per series.
        transfer_syntax: the export's transfer syntax UID (lossless compression at some sites).
    """

    vendor: str
    manufacturer: str
    model: str
    field_strength: float
    institution: str
    body_part_tag: bool = True
    region_mix: dict[str, float] = field(default_factory=lambda: {"brain": 0.5, "knee": 0.25, "spine": 0.25})
    prevalence: dict[str, float] = field(default_factory=lambda: {
        "mass": 0.35, "infarct": 0.3, "wmh": 1.0, "effusion": 0.35, "disc_herniation": 0.4})
    contrast_rate: float = 0.3
    age_mean: float = 55.0
    age_sd: float = 16.0
    male_fraction: float = 0.5
    snr: float = 22.0
    bias: float = 0.12
    level: float = 1000.0
    inplane_pos: float = 0.5
    slice_pos: float = 0.5
    brain_t1: str = "se"
    planes: dict[str, str] = field(default_factory=dict)
    oblique_deg: float = 6.0
    adc_series: bool = True
    second_study_rate: float = 0.12
    id_prefix: str = "SYN"
    enhanced: bool = False
    transfer_syntax: str = ExplicitVRLittleEndian

    def plane(self, region: str, family: str, default: str) -> str:
        """Acquisition plane of ``family`` series in ``region`` at this site."""
        return self.planes.get(f"{region}.{family}", default)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ARCHETYPES: tuple[SiteProfile, ...] = (
    # Academic neuro centre: 3 T, brain-heavy, many tumours, fine resolution, 3D T1.
    SiteProfile(vendor="siemens", manufacturer="SIEMENS", model="MAGNETOM Prisma", field_strength=3.0,
                institution="Synthetic University Hospital", region_mix={"brain": 0.65, "knee": 0.15, "spine": 0.2},
                prevalence={"mass": 0.45, "infarct": 0.3, "wmh": 1.0, "effusion": 0.3, "disc_herniation": 0.4},
                contrast_rate=0.35, age_mean=54.0, snr=26.0, bias=0.10, level=900.0, inplane_pos=0.25,
                slice_pos=0.35, brain_t1="gre", planes={"brain.T1": "sagittal"}, oblique_deg=6.0, id_prefix="UH"),
    # Community hospital: 1.5 T, older patients, spine-heavy, coarse, and no BodyPartExamined.
    SiteProfile(vendor="ge", manufacturer="GE MEDICAL SYSTEMS", model="SIGNA Explorer", field_strength=1.5,
                institution="Synthetic Community Hospital", body_part_tag=False,
                region_mix={"brain": 0.35, "knee": 0.25, "spine": 0.4},
                prevalence={"mass": 0.3, "infarct": 0.35, "wmh": 1.2, "effusion": 0.4, "disc_herniation": 0.55},
                contrast_rate=0.2, age_mean=64.0, age_sd=13.0, male_fraction=0.45, snr=17.0, bias=0.2,
                level=2200.0, inplane_pos=0.85, slice_pos=0.9, oblique_deg=4.0, id_prefix="CH"),
    # Orthopaedic and sports clinic: 3 T, knee-heavy, young, steep oblique axials.
    SiteProfile(vendor="philips", manufacturer="Philips Medical Systems", model="Ingenia", field_strength=3.0,
                institution="Synthetic Orthopaedic Clinic", region_mix={"brain": 0.25, "knee": 0.5, "spine": 0.25},
                prevalence={"mass": 0.3, "infarct": 0.25, "wmh": 0.8, "effusion": 0.5, "disc_herniation": 0.45},
                contrast_rate=0.2, age_mean=41.0, age_sd=15.0, male_fraction=0.6, snr=24.0, bias=0.15,
                level=380.0, inplane_pos=0.4, slice_pos=0.4, planes={"knee.T2": "coronal", "brain.T1": "axial"},
                oblique_deg=22.0, adc_series=False, id_prefix="OC", enhanced=True),
    # Stroke centre: 1.5 T, many infarcts, coronal FLAIR.
    SiteProfile(vendor="canon", manufacturer="CANON_MEC", model="Vantage Orian", field_strength=1.5,
                institution="Synthetic Stroke Centre", region_mix={"brain": 0.7, "knee": 0.1, "spine": 0.2},
                prevalence={"mass": 0.3, "infarct": 0.55, "wmh": 1.1, "effusion": 0.3, "disc_herniation": 0.4},
                contrast_rate=0.15, age_mean=67.0, age_sd=12.0, male_fraction=0.55, snr=18.0, bias=0.18,
                level=600.0, inplane_pos=0.7, slice_pos=0.6, planes={"brain.FLAIR": "coronal"}, id_prefix="SC",
                transfer_syntax=JPEGLSLossless),
    # General hospital: 1.5 T Siemens, balanced mix.
    SiteProfile(vendor="siemens", manufacturer="SIEMENS", model="MAGNETOM Aera", field_strength=1.5,
                institution="Synthetic General Hospital", snr=19.0, bias=0.14, level=1200.0, inplane_pos=0.6,
                slice_pos=0.7, planes={"knee.T2": "axial"}, id_prefix="GH", transfer_syntax=RLELossless),
)


# Case mix of a hospital used only for evaluation: every region and finding well represented, so that
# each finding's AUROC rests on enough positives and negatives (its scanners stay the archetype's).
BALANCED_REGIONS = {"brain": 0.5, "knee": 0.25, "spine": 0.25}
BALANCED_PREVALENCE = {"mass": 0.4, "infarct": 0.45, "wmh": 0.8, "effusion": 0.5, "disc_herniation": 0.55}
CASE_MIXES = ("site", "balanced")


def site_profile(site_index: int, rng: np.random.Generator, case_mix: str = "site") -> SiteProfile:
    """The profile of site ``site_index`` (1-based), jittered so repeated archetypes differ.

    Args:
        site_index: 1 for site-01, ...
        rng: the site's random source.
        case_mix: ``"site"`` (the archetype's patients) or ``"balanced"`` (an
            evaluation hospital: :data:`BALANCED_REGIONS`, :data:`BALANCED_PREVALENCE`
            and ages spread over adulthood).
    """
    if case_mix not in CASE_MIXES:
        raise ValueError(f"unknown case mix {case_mix!r}; choose one of {', '.join(CASE_MIXES)}")
    base = ARCHETYPES[(site_index - 1) % len(ARCHETYPES)]
    if case_mix == "balanced":
        base = replace(base, region_mix=dict(BALANCED_REGIONS), prevalence=dict(BALANCED_PREVALENCE),
                       age_mean=52.0, age_sd=18.0, male_fraction=0.5)
    j = lambda v, rel: float(v * rng.uniform(1.0 - rel, 1.0 + rel))  # noqa: E731
    mix = {k: j(v, 0.2) for k, v in base.region_mix.items()}
    total = sum(mix.values())
    prevalence = {k: float(np.clip(j(v, 0.2), 0.0, 1.5)) for k, v in base.prevalence.items()}
    return replace(
        base,
        institution=base.institution if site_index <= len(ARCHETYPES) else f"{base.institution} {site_index}",
        region_mix={k: v / total for k, v in mix.items()},
        prevalence=prevalence,
        age_mean=j(base.age_mean, 0.08),
        snr=j(base.snr, 0.1),
        bias=j(base.bias, 0.2),
        level=j(base.level, 0.15),
        inplane_pos=float(np.clip(base.inplane_pos + rng.normal(0.0, 0.05), 0.0, 1.0)),
        slice_pos=float(np.clip(base.slice_pos + rng.normal(0.0, 0.05), 0.0, 1.0)),
        id_prefix=base.id_prefix,
    )
