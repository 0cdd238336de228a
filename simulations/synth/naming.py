"""Series and study names in each vendor's and site's style.

The same T2 axial is "t2_tse_tra" on a Siemens, "AX T2 FSE" on a GE,
"T2W_TSE_TRA" on a Philips and "T2WI FSE AX" on a Canon; a sequence
classifier must not depend on one house style.
"""

from __future__ import annotations

from fedmri.simulations.synth.contrast import Acquisition
from fedmri.simulations.synth.protocols import SeriesPlan

_PLANE = {
    "siemens": {"axial": "tra", "sagittal": "sag", "coronal": "cor"},
    "ge": {"axial": "AX", "sagittal": "SAG", "coronal": "COR"},
    "philips": {"axial": "TRA", "sagittal": "SAG", "coronal": "COR"},
    "canon": {"axial": "AX", "sagittal": "SAG", "coronal": "COR"},
}


def series_description(vendor: str, plan: SeriesPlan, acq: Acquisition) -> str:
    """SeriesDescription as the vendor's console would write it."""
    pl = _PLANE[vendor][plan.plane]
    fam, fs, gre = plan.family, plan.fat_sat, acq.kind == "GR"
    if vendor == "siemens":
        base = {"T1": "t1_mprage" if gre else "t1_tse", "T1post": "t1_mprage" if gre else "t1_tse",
                "T2": "t2_tse", "PD": "pd_tse", "FLAIR": "t2_tirm", "DWI": "ep2d_diff_b1000",
                "ADC": "ep2d_diff_b1000"}[fam]
        name = f"{base}{'_fs' if fs else ''}_{pl}"
        if fam == "FLAIR":
            name += "_dark-fluid"
        return name + {"T1post": "_KM", "DWI": "_TRACEW", "ADC": "_ADC"}.get(fam, "")
    if vendor == "ge":
        base = {"T1": "T1 FSPGR" if gre else "T1 SE", "T1post": "T1 FSPGR" if gre else "T1 SE", "T2": "T2 FSE",
                "PD": "PD FSE", "FLAIR": "T2 FLAIR", "DWI": "DWI B1000", "ADC": "ADC (10^-6 mm2/s)"}[fam]
        if fam == "ADC":
            return base
        return f"{pl} {base}{' FS' if fs else ''}{' +C' if fam == 'T1post' else ''}"
    if vendor == "philips":
        base = {"T1": "T1W_3D_TFE" if gre else "T1W_SE", "T1post": "T1W_3D_TFE" if gre else "T1W_SE",
                "T2": "T2W_TSE", "PD": "PDW_TSE", "FLAIR": "FLAIR", "DWI": "DWI_b1000", "ADC": "dADC"}[fam]
        if fs:
            base = base.replace("_TSE", "_SPAIR")
        return f"{base}_{pl}{'+C' if fam == 'T1post' else ''}"
    base = {"T1": "T1WI FE" if gre else "T1WI SE", "T1post": "T1WI FE" if gre else "T1WI SE", "T2": "T2WI FSE",
            "PD": "PDWI FSE", "FLAIR": "FLAIR", "DWI": "DWI b=1000", "ADC": "ADC map"}[fam]
    return f"{base}{' FS' if fs else ''} {pl}{' CE' if fam == 'T1post' else ''}"


def study_description(vendor: str, region: str, contrast: bool, laterality: str | None) -> str:
    """StudyDescription as the site's RIS writes it; always names the body region."""
    side = {"R": "RIGHT", "L": "LEFT"}.get(laterality or "", "")
    if vendor in ("siemens", "canon"):
        return {"brain": f"MRI BRAIN {'WITH AND WITHOUT CONTRAST' if contrast else 'WITHOUT CONTRAST'}",
                "knee": f"MRI KNEE {side}".strip(), "spine": "MRI LUMBAR SPINE"}[region]
    if vendor == "ge":
        return {"brain": f"MR BRAIN {'W/WO' if contrast else 'WO'} CONTRAST", "knee": f"MR {side} KNEE WO".strip(),
                "spine": "MR L-SPINE WO"}[region]
    return {"brain": f"MR Head/Brain{' with contrast' if contrast else ''}", "knee": f"MR Knee {side.title()}".strip(),
            "spine": "MR Lumbar Spine"}[region]


BODY_PART = {"brain": "BRAIN", "knee": "KNEE", "spine": "LSPINE"}
