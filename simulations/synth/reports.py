"""Radiology reports written from a study's ground truth.

Each report names the examination, the sequences and planes actually
acquired, describes every finding present (size, location, grade, with
several phrasings per finding) and negates a random subset of the absent
ones, plus age-related background (volume loss, disc desiccation, chondral
thinning). Wording varies between studies so that image-text alignment has
to learn the content, not look up one sentence.
"""

from __future__ import annotations

import numpy as np

from fedmri.simulations.synth.brain import atrophy_factor
from fedmri.simulations.synth.cohort import Patient, Study

_SEQ = {"T1": "T1", "T1post": "T1 post-contrast", "T2": "T2", "PD": "proton density", "FLAIR": "FLAIR",
        "DWI": "diffusion-weighted", "ADC": "ADC map"}
_HISTORY = {"brain": ("Headache.", "Dizziness.", "Follow-up.", "Memory complaints.", "Seizure.", "Weakness."),
            "knee": ("Knee pain.", "Twisting injury.", "Pain after running.", "Locking sensation."),
            "spine": ("Low back pain.", "Radiating leg pain.", "Sciatica.", "Back pain, no trauma.")}
_ROOT = {"L3-L4": "L4", "L4-L5": "L5", "L5-S1": "S1"}


def _size(mm: tuple[float, ...], rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return " x ".join(f"{v / 10:.1f}" for v in mm) + " cm"
    return " x ".join(f"{v:.0f}" for v in mm) + " mm"


def _technique(study: Study, rng: np.random.Generator) -> str:
    parts = [f"{p.plane} {_SEQ[p.family]}{' fat-suppressed' if p.fat_sat else ''}" for p in study.series]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    where = {"brain": "the brain", "knee": "the knee", "spine": "the lumbar spine"}[study.region]
    form = int(rng.integers(3))
    if form == 0:
        return f"{listed[0].upper()}{listed[1:]} images of {where} were obtained."
    if form == 1:
        return f"Multiplanar MRI of {where}: {listed}."
    return f"Sequences: {listed}."


def _exam(study: Study) -> str:
    side = {"R": "right ", "L": "left "}.get(study.laterality or "", "")
    region = {"brain": "brain", "knee": f"{side}knee", "spine": "lumbar spine"}[study.region]
    return f"MRI {region} {'without and with' if study.contrast else 'without'} contrast"


def _pick(rng: np.random.Generator, *options: str) -> str:
    return options[int(rng.integers(len(options)))]


def _brain(study: Study, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    f = {x.code: x for x in study.findings}
    body, imp = [], []
    if "mass" in f:
        m, size = f["mass"], _size(f["mass"].size_mm, rng)
        enh = ("rim-enhancing " if m.attrs["necrotic"] else "enhancing ") if study.contrast else ""
        core = " with a necrotic centre" if m.attrs["necrotic"] else ""
        body.append(_pick(rng, f"There is a {size} {enh}intra-axial mass in the {m.location}{core}, with surrounding "
                               "T2/FLAIR hyperintense vasogenic edema.",
                          f"A {enh}mass centred in the {m.location} measures {size}{core}; it is surrounded by "
                          "vasogenic edema.",
                          f"{m.location[0].upper()}{m.location[1:]} {enh}mass measuring {size}{core} with "
                          "perilesional edema."))
        if max(m.size_mm) > 30:
            body.append("There is mild local mass effect with effacement of the adjacent sulci.")
        imp.append(f"{enh.capitalize() or 'Intra-axial '}mass in the {m.location}, "
                   + _pick(rng, "suspicious for high-grade glioma.", "differential includes metastasis and "
                           "high-grade glioma.", "consistent with neoplasm."))
    elif rng.random() < 0.7:
        body.append(_pick(rng, "No intracranial mass or mass effect.", "No mass, midline shift or hydrocephalus.",
                          "There is no mass lesion." + (" No abnormal enhancement." if study.contrast else "")))
    if "infarct" in f:
        i, size = f["infarct"], _size(f["infarct"].size_mm, rng)
        kind = "lacunar infarct" if i.attrs["lacunar"] else "infarct"
        body.append(_pick(rng, f"Restricted diffusion in the {i.location} measuring {size}, with low ADC and mild "
                               f"FLAIR hyperintensity, consistent with acute {kind}.",
                          f"There is an acute {kind} in the {i.location} ({i.attrs['territory']} territory), "
                          f"measuring {size}.",
                          f"Focus of diffusion restriction in the {i.location}, {size}, compatible with acute {kind}."))
        imp.append(f"Acute {kind} in the {i.location}.")
    elif rng.random() < 0.8:
        body.append(_pick(rng, "No restricted diffusion to suggest acute infarct.", "No acute infarct.",
                          "No evidence of acute infarct."))
    if "wmh" in f:
        w = f["wmh"]
        g = w.attrs["grade"]
        body.append(_pick(rng, f"{g.capitalize()} scattered periventricular and deep white matter T2/FLAIR "
                               "hyperintensities, likely chronic small vessel ischemic change.",
                          f"There are {g} confluent and punctate white matter hyperintensities on FLAIR "
                          f"({w.attrs['count']} foci).",
                          f"{g.capitalize()} burden of white matter hyperintensities in the periventricular and deep "
                          "white matter."))
        imp.append(f"{g.capitalize()} chronic small vessel ischemic white matter changes.")
    elif rng.random() < 0.6:
        body.append(_pick(rng, "No significant white matter signal abnormality.",
                          "The white matter is normal in signal."))
    a = atrophy_factor(study.age)
    body.append("The ventricles and sulci are normal in size." if a < 0.3 else
                "Mild generalized parenchymal volume loss." if a < 0.65 else
                "Moderate generalized volume loss with ex vacuo ventricular enlargement.")
    body.append(_pick(rng, "No extra-axial collection.", "No hemorrhage or extra-axial collection.",
                      "The major intracranial flow voids are preserved."))
    if not imp:
        imp.append(_pick(rng, "No acute intracranial abnormality.", "Unremarkable MRI of the brain.",
                         "Normal MRI brain for age."))
    elif "infarct" not in f and rng.random() < 0.5:
        imp.append("No acute infarct.")
    return body, imp


def _knee(study: Study, age: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    f = {x.code: x for x in study.findings}
    body = ["Menisci: " + _pick(rng, "intact.", "no meniscal tear."),
            "Ligaments: " + _pick(rng, "cruciate and collateral ligaments intact.", "intact.")]
    body.append("Cartilage: " + ("mild diffuse chondral thinning." if age > 55 else "preserved."))
    body.append("Bones: " + _pick(rng, "no marrow edema or fracture.", "normal marrow signal."))
    imp = []
    if "effusion" in f:
        e = f["effusion"]
        g = e.attrs["grade"]
        body.append("Joint fluid: " + _pick(rng, f"{g} joint effusion distending the suprapatellar recess.",
                                            f"{g} suprapatellar effusion, {e.size_mm[0]:.0f} mm in AP depth.",
                                            f"there is a {g} knee joint effusion."))
        imp.append(f"{g.capitalize()} joint effusion.")
    else:
        body.append("Joint fluid: " + _pick(rng, "no joint effusion.", "physiologic amount, no effusion."))
        imp.append(_pick(rng, "No joint effusion.", "Unremarkable MRI of the knee. No effusion."))
    if age > 55:
        imp.append("Mild degenerative chondral thinning.")
    return body, imp


def _spine(study: Study, age: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    f = {x.code: x for x in study.findings}
    degen = age > 52
    body = ["Alignment: " + _pick(rng, "normal lumbar lordosis.", "maintained."),
            "Vertebrae: heights maintained; " + ("heterogeneous fatty marrow, age related." if age > 60 else
                                                 "normal marrow signal."),
            "Conus: terminates at L1-L2, normal."]
    imp = []
    for level in ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"):
        h = f.get("disc_herniation")
        if h is not None and h.attrs["level"] == level:
            side, kind = h.attrs["side"], h.attrs["kind"]
            effect = (f"contacting the descending {'left ' if 'left' in side else 'right ' if 'right' in side else ''}"
                      f"{_ROOT[level]} nerve root" if side != "central" else "mildly narrowing the spinal canal")
            body.append(f"{level}: {side} disc {kind} measuring {h.size_mm[0]:.0f} mm, {effect}.")
            imp.append(f"{side.capitalize()} disc {kind} at {level}, {effect}.")
        elif degen and level in ("L4-L5", "L5-S1"):
            body.append(f"{level}: disc desiccation with mild loss of height; no herniation or stenosis.")
        else:
            body.append(f"{level}: " + _pick(rng, "unremarkable.", "no disc herniation or stenosis."))
    if not imp:
        imp.append(_pick(rng, "No disc herniation or spinal stenosis.", "No lumbar disc herniation."))
    if degen:
        imp.append("Degenerative disc desiccation at the lower lumbar levels.")
    return body, imp


def write_report(study: Study, patient: Patient, rng: np.random.Generator) -> tuple[str, str]:
    """``(findings, impression)`` texts of one study for reports.csv.

    The findings text starts with the examination, indication and technique,
    as a radiology report's body does.
    """
    age = study.age
    if study.region == "brain":
        body, imp = _brain(study, rng)
    elif study.region == "knee":
        body, imp = _knee(study, age, rng)
    else:
        body, imp = _spine(study, age, rng)
    who = f"{int(age)}-year-old {'man' if patient.sex == 'M' else 'woman'}"
    history = f"{who}. {_pick(rng, *_HISTORY[study.region])}"
    head = (f"EXAMINATION: {_exam(study)}.\nINDICATION: {history}\n"
            f"TECHNIQUE: {_technique(study, rng)}\nFINDINGS:\n")
    numbered = len(imp) > 1 and rng.random() < 0.5
    impression = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(imp)) if numbered else " ".join(imp)
    return head + "\n".join(body), impression
