"""Synthetic hospitals: the orchestration behind ``fedmri data synth``.

For each site: draw its profile and cohort, then for every study build the
patient's anatomy and render each series, writing real DICOM through
:func:`fedmri.simulations.dicom_writer.write_series`, a ground-truth lesion
mask (NIfTI, same grid and affine as the series) where a lesion shows, and
finally ``reports.csv``, ``labels.csv``, ``series.csv`` and ``site.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmri.data.volume import Volume
from fedmri.errors import ConfigError
from fedmri.simulations.dicom_writer import write_series
from fedmri.simulations.synth import site_dir as sd
from fedmri.simulations.synth.anatomy import FINDING_CODES, MASK_LABELS, Anatomy, Pose, random_pose
from fedmri.simulations.synth.brain import BrainAnatomy
from fedmri.simulations.synth.brain_atlas import BrainAtlas, load_atlas
from fedmri.simulations.synth.cohort import Patient, Study, plan_site
from fedmri.simulations.synth.knee import KneeAnatomy
from fedmri.simulations.synth.layout import PRESETS, series_grid
from fedmri.simulations.synth.naming import BODY_PART, series_description, study_description
from fedmri.simulations.synth.protocols import acquisition, acquisition_tags
from fedmri.simulations.synth.render import Chain, render_series
from fedmri.simulations.synth.reports import write_report
from fedmri.simulations.synth.sites import CASE_MIXES, SiteProfile, site_profile
from fedmri.simulations.synth.spine import SpineAnatomy

Progress = Callable[[str, int, int], None]


@dataclass
class SiteInfo:
    """Summary of one generated site.

    Attributes:
        name: folder name, "site-01", ...
        path: the site folder.
        n_series, n_studies, n_patients: counts.
        vendor, model, field_strength, institution: the scanner and hospital.
        regions: studies per body region.
        findings: studies per finding code.
        reused: True when a complete folder from an identical earlier run was kept.
    """

    name: str
    path: Path
    n_series: int
    n_studies: int
    n_patients: int
    vendor: str
    model: str
    field_strength: float
    institution: str
    regions: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)
    reused: bool = False


def check_args(sites: int, seed: int, preset: str, series_per_site: int, workers: int) -> None:
    """Raise :class:`ConfigError` naming the first bad argument."""
    for name, value, low in (("sites", sites, 1), ("series_per_site", series_per_site, 1), ("workers", workers, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic-site preset {preset!r}; choose one of {sorted(PRESETS)}")


def site_name(site_index: int) -> str:
    """Folder name of site ``site_index``: "site-01", ..."""
    return f"site-{site_index:02d}"


def build_anatomy(study: Study, patient: Patient, atlas: BrainAtlas | None) -> Anatomy:
    """The body region of ``study`` for ``patient``: pose, size, fat and findings from the plan."""
    rng = np.random.default_rng(study.anatomy_seed)
    fat = patient.adiposity
    if study.region == "brain":
        assert atlas is not None, "brain studies need the atlas"
        return BrainAnatomy(atlas, random_pose(rng, patient.scale, 4.0, 6.0), study.age, study.findings,
                            patient.atrophy_jitter)
    if study.region == "knee":
        left = study.laterality == "L"
        pose = random_pose(rng, patient.scale, 4.0, 6.0, mirror_x=left)
        side_shift = np.array([(-1.0 if left else 1.0) * rng.uniform(30.0, 80.0), 0.0, 0.0])  # knee off the midline
        pose = Pose(pose.rotation, pose.offset + side_shift, pose.scale)
        fat_mm = float(np.clip((12.0 if patient.sex == "F" else 7.0) + 4.0 * fat, 3.0, 25.0))
        return KneeAnatomy(pose, study.age, fat_mm, study.findings)
    fat_mm = float(np.clip((25.0 if patient.sex == "F" else 18.0) + 8.0 * fat, 6.0, 50.0))
    return SpineAnatomy(random_pose(rng, patient.scale, 3.0, 6.0), study.age, fat_mm, study.findings)


def _study_tags(site: SiteProfile, patient: Patient, study: Study, time: str) -> dict[str, Any]:
    tags = {
        "PatientName": patient.name, "PatientID": patient.patient_id, "PatientSex": patient.sex,
        "PatientBirthDate": f"{patient.birth_date:%Y%m%d}", "PatientAge": f"{int(study.age):03d}Y",
        "StudyInstanceUID": study.study_uid, "FrameOfReferenceUID": study.frame_uid,
        "StudyDate": f"{study.date:%Y%m%d}", "StudyTime": time, "AccessionNumber": study.accession,
        "StudyID": study.accession[-5:],
        "StudyDescription": study_description(site.vendor, study.region, study.contrast, study.laterality),
        "Manufacturer": site.manufacturer, "ManufacturerModelName": site.model, "InstitutionName": site.institution,
        "StationName": f"MR{site.id_prefix}1",
        "BodyPartExamined": BODY_PART[study.region] if site.body_part_tag else "",  # empty at one site, as in life
        "PatientPosition": "FFS" if study.region == "knee" else "HFS",
    }
    if study.laterality:
        tags["Laterality"] = study.laterality
    return tags


def generate_site(out_dir: str | Path, *, site_index: int, seed: int, preset: str = "demo",
                  series_per_site: int = 40, case_mix: str = "site", progress: Progress | None = None) -> SiteInfo:
    """Generate one synthetic hospital in ``out_dir`` (the site folder itself).

    Args:
        out_dir: the site folder; created if missing. A complete folder from an
            identical earlier run is kept as it is.
        site_index: 1-based index: picks the site archetype, seeds it, and goes into identifiers.
        seed: federation seed; the site's randomness derives from (seed, site_index).
        preset: "demo" (small series) or "full" (clinical sizes).
        series_per_site: exact number of series to write.
        case_mix: "site" (the archetype's patients) or "balanced" (for a hospital
            held out for evaluation; see :func:`~fedmri.simulations.synth.sites.site_profile`).
        progress: called as ``progress(site_name, done, total)`` after each series.

    Returns:
        The site's summary.

    Raises:
        ConfigError: bad argument values.
        InputError: ``out_dir`` is a file or holds something this call must not overwrite.
    """
    if isinstance(site_index, bool) or not isinstance(site_index, int | np.integer) or site_index < 1:
        raise ConfigError(f"site_index must be an integer >= 1, got {site_index!r}")
    check_args(1, seed, preset, series_per_site, 1)
    path = Path(out_dir)
    name = site_name(site_index)
    if case_mix not in CASE_MIXES:
        raise ConfigError(f"unknown case mix {case_mix!r}; choose one of {', '.join(CASE_MIXES)}")
    params = sd.generator_params(seed, site_index, preset, series_per_site, case_mix)
    state = sd.site_state(path, params)
    if state == "done":
        info = sd.read_site_json(path)
        assert info is not None, "site_state said done"
        return SiteInfo(path=path, reused=True, **info["summary"])
    if state == "redo":
        sd.clear_owned(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, site_index])
    site = site_profile(site_index, rng, case_mix)
    atlas = load_atlas(PRESETS[preset].atlas_mm) if site.region_mix.get("brain", 0) > 0 else None
    wm_points = atlas.wm_points if atlas is not None else np.zeros((1, 3), np.float32)
    patients = plan_site(site, site_index, seed, series_per_site, wm_points, rng)
    site_json = {"params": params, "complete": False, "name": name, "profile": site.to_json(),
                 "mask_labels": {str(v): k for k, v in MASK_LABELS.items()}}
    sd.write_json(path / "site.json", site_json)

    rows: dict[str, list[dict[str, Any]]] = {"reports": [], "labels": [], "series": []}
    done = 0
    if progress:
        progress(name, 0, series_per_site)
    for patient in patients:
        p_dir = f"dicom/{int(rng.integers(16**8)):08X}"
        for study in patient.studies:
            s_dir = f"{p_dir}/{int(rng.integers(16**8)):08X}"
            anatomy = build_anatomy(study, patient, atlas)
            hh, mm = int(rng.integers(7, 19)), int(rng.integers(0, 60))
            base_tags = _study_tags(site, patient, study, f"{hh:02d}{mm:02d}00")
            findings_text, impression = write_report(study, patient, rng)
            rows["reports"].append({"accession_number": study.accession, "study_instance_uid": study.study_uid,
                                    "findings": findings_text, "impression": impression})
            for i, (plan, uid) in enumerate(zip(study.series, study.series_uids, strict=True)):
                done += 1
                srng = np.random.default_rng([seed, site_index, done])
                acq = acquisition(plan, study.region, site, srng)
                affine, shape = series_grid(plan, anatomy, site, PRESETS[preset], srng)
                chain = Chain(site.field_strength, site.snr, site.bias, site.level * srng.uniform(0.9, 1.1))
                image, mask = render_series(anatomy, acq, affine, shape, chain, srng)
                desc = series_description(site.vendor, plan, acq)
                tags = {**base_tags, **acquisition_tags(acq, site), "SeriesInstanceUID": uid,
                        "SeriesNumber": str((i + 1) * (100 if site.vendor == "philips" else 1)),
                        "SeriesDescription": desc, "ProtocolName": desc, "SeriesDate": f"{study.date:%Y%m%d}",
                        "SeriesTime": f"{hh:02d}{min(mm + 4 * i, 59):02d}00"}
                rel = f"{s_dir}/{int(srng.integers(16**8)):08X}"
                write_series(path / rel, Volume(image, affine), tags, rng=srng, enhanced=site.enhanced,
                             transfer_syntax=site.transfer_syntax)
                mask_rel = _save_mask(path, uid, mask, affine)
                rows["labels"].append({"series_instance_uid": uid, "findings": _codes(study), "mask": mask_rel,
                                       "age": f"{study.age:.1f}", "sex": patient.sex})
                rows["series"].append(_series_row(uid, patient, study, plan.fat_sat, acq.family, plan.plane,
                                                  acq.contrast, affine, shape, rel))
                if progress:
                    progress(name, done, series_per_site)

    sd.write_csv(path / "reports.csv", sd.REPORT_COLUMNS, rows["reports"])
    sd.write_csv(path / "labels.csv", sd.LABEL_COLUMNS, rows["labels"])
    sd.write_csv(path / "series.csv", sd.SERIES_COLUMNS, rows["series"])
    studies = [s for p in patients for s in p.studies]
    summary = {"name": name, "n_series": done, "n_studies": len(studies), "n_patients": len(patients),
               "vendor": site.manufacturer, "model": site.model, "field_strength": site.field_strength,
               "institution": site.institution, "regions": dict(Counter(s.region for s in studies)),
               "findings": dict(Counter(f.code for s in studies for f in s.findings))}
    sd.write_json(path / "site.json", {**site_json, "complete": True, "summary": summary})
    return SiteInfo(path=path, **summary)


def _codes(study: Study) -> str:
    """labels.csv findings: the study's codes, ';'-separated, in a fixed order."""
    return ";".join(c for c in FINDING_CODES if any(f.code == c for f in study.findings))


def _save_mask(site: Path, uid: str, mask: np.ndarray, affine: np.ndarray) -> str:
    """Write a lesion mask in the series grid; returns its path relative to the site ("" if no lesion shows)."""
    if not mask.any():
        return ""
    rel = f"masks/{uid}.nii.gz"
    (site / "masks").mkdir(exist_ok=True)
    img = nib.Nifti1Image(mask, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, site / rel)
    return rel


def _series_row(uid: str, patient: Patient, study: Study, fat_sat: bool, family: str, plane: str, contrast: bool,
                affine: np.ndarray, shape: tuple[int, int, int], rel: str) -> dict[str, Any]:
    """series.csv: the per-series ground truth that the DICOM tags should let a reader infer."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    normal = affine[:3, 2] / spacing[2]
    tilt = float(np.degrees(np.arccos(np.clip(np.abs(normal).max(), -1.0, 1.0))))  # off the nearest patient axis
    return {"series_instance_uid": uid, "study_instance_uid": study.study_uid, "accession_number": study.accession,
            "patient_id": patient.patient_id, "region": study.region, "sequence_family": family, "plane": plane,
            "tilt_deg": f"{tilt:.1f}", "fat_sat": int(fat_sat), "contrast": int(contrast),
            "shape": "x".join(map(str, shape)), "voxel_size": "x".join(f"{v:.3f}" for v in spacing), "dicom_dir": rel}
