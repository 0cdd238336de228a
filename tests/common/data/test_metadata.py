"""Metadata rules as tables of tag combinations (vendor styles and physics-only cases)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.data.metadata import (
    SEQUENCE_FAMILIES,
    has_contrast,
    infer_body_region,
    infer_plane,
    infer_sequence_family,
    normalise_sex,
    normalise_vendor,
    parse_age,
    series_metadata,
)

from helpers.geometry import rotation

FAMILY_CASES = [
    # descriptions, several vendors' styles
    ({"SeriesDescription": "t2_tse_tra"}, "T2"),  # Siemens
    ({"SeriesDescription": "Ax T2 FRFSE"}, "T2"),  # GE
    ({"SeriesDescription": "T2W_TSE"}, "T2"),  # Philips
    ({"SeriesDescription": "AX FLAIR"}, "FLAIR"),
    ({"SeriesDescription": "t2_tirm_tra_dark-fluid"}, "FLAIR"),
    ({"SeriesDescription": "Sag T1 FLAIR"}, "T1"),  # GE T1 FLAIR is T1-weighted
    ({"SeriesDescription": "T1 MPRAGE"}, "T1"),
    ({"SeriesDescription": "t1_mprage_sag_p2_iso"}, "T1"),
    ({"SeriesDescription": "T1W_3D_TFE"}, "T1"),
    ({"SeriesDescription": "Ax T1 +C"}, "T1post"),
    ({"SeriesDescription": "3D Ax T1 BRAVO +C"}, "T1post"),
    ({"SeriesDescription": "t1_vibe_fs_tra_post"}, "T1post"),
    ({"SeriesDescription": "T1W_SE_GD"}, "T1post"),
    ({"SeriesDescription": "T1 pre-contrast"}, "T1"),
    ({"SeriesDescription": "Ax T1 SE", "ContrastBolusAgent": "Gadavist 7 ml"}, "T1post"),
    ({"SeriesDescription": "Ax T1 SE", "ContrastBolusAgent": "NONE"}, "T1"),
    ({"SeriesDescription": "DWI b1000"}, "DWI"),
    ({"SeriesDescription": "ep2d_diff_mddw_20_p2_TRACEW"}, "DWI"),
    ({"SeriesDescription": "Ax DWI 1000b"}, "DWI"),
    ({"SeriesDescription": "ADC"}, "ADC"),
    ({"SeriesDescription": "ep2d_diff_ADC"}, "ADC"),
    ({"SeriesDescription": "dADC"}, "ADC"),
    ({"SeriesDescription": "Apparent Diffusion Coefficient (mm2/s)"}, "ADC"),
    ({"SeriesDescription": "SWI"}, "SWI"),
    ({"SeriesDescription": "Ax SWAN"}, "SWI"),
    ({"SeriesDescription": "SWIp"}, "SWI"),
    ({"SeriesDescription": "T2* GRE"}, "SWI"),
    ({"SeriesDescription": "T2_FFE"}, "SWI"),
    ({"SeriesDescription": "pd_tse_fs_cor"}, "PD"),
    ({"SeriesDescription": "PDW_TSE"}, "PD"),
    ({"SeriesDescription": "localizer"}, "other"),
    ({"SeriesDescription": "TOF_3D_multi-slab"}, "other"),
    # physics only: no description
    ({"DiffusionBValue": 1000}, "DWI"),
    ({"ScanningSequence": ["SE", "IR"], "InversionTime": 2500, "RepetitionTime": 9000, "EchoTime": 85}, "FLAIR"),
    ({"ScanningSequence": "SE\\IR", "InversionTime": 150, "RepetitionTime": 4000, "EchoTime": 40}, "T2"),  # STIR
    ({"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "InversionTime": 900,
      "RepetitionTime": 2300, "EchoTime": 2.3}, "T1"),  # MPRAGE
    ({"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 12}, "T1"),
    ({"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 12, "ContrastBolusAgent": "Dotarem"}, "T1post"),
    ({"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 100}, "T2"),
    ({"ScanningSequence": "SE", "RepetitionTime": 3000, "EchoTime": 20}, "PD"),
    ({"ScanningSequence": "GR", "RepetitionTime": 600, "EchoTime": 20}, "SWI"),  # T2* GRE
    ({"ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": 8, "EchoTime": 3}, "T1"),
    ({"ScanningSequence": "EP", "RepetitionTime": 2000, "EchoTime": 30}, "other"),  # BOLD fMRI
    ({"ScanningSequence": "SE", "RepetitionTime": 1200, "EchoTime": 45}, "other"),  # in-between
    ({}, "other"),
    # SequenceName / ImageType alone
    ({"SequenceName": "*ep_b1000t"}, "DWI"),
    ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}, "ADC"),
    # description wins over physics
    ({"SeriesDescription": "t2_flair_tra", "RepetitionTime": 500, "EchoTime": 10}, "FLAIR"),
]


@pytest.mark.parametrize(("tags", "family"), FAMILY_CASES)
def test_sequence_family(tags: dict, family: str) -> None:
    assert infer_sequence_family(tags) == family


def test_every_family_is_covered_by_the_table() -> None:
    assert {family for _, family in FAMILY_CASES} == set(SEQUENCE_FAMILIES)


@pytest.mark.parametrize(("tags", "expected"), [
    ({"SeriesDescription": "Ax T1 +C"}, True),
    ({"SeriesDescription": "T1 post gad"}, True),
    ({"SeriesDescription": "T1 precontrast"}, False),
    ({"SeriesDescription": "T1 non-contrast"}, False),
    ({"SeriesDescription": "T1", "ContrastBolusAgent": "no"}, False),
    ({"ContrastBolusAgent": "MultiHance"}, True),
])
def test_contrast(tags: dict, expected: bool) -> None:
    assert has_contrast(tags) is expected


@pytest.mark.parametrize(("tags", "region"), [
    ({"BodyPartExamined": "HEAD"}, "brain"),
    ({"BodyPartExamined": "BRAIN", "StudyDescription": "MRI knee"}, "brain"),  # the tag wins
    ({"BodyPartExamined": "LSPINE"}, "spine"),
    ({"BodyPartExamined": "C-SPINE"}, "spine"),
    ({"BodyPartExamined": "KNEE"}, "knee"),
    ({"BodyPartExamined": "FOOT"}, "foot"),  # unmapped: lower-cased as given
    ({"StudyDescription": "MR BRAIN W/WO CONTRAST"}, "brain"),
    ({"StudyDescription": "MRT Kopf"}, "brain"),
    ({"SeriesDescription": "Sag T2 L-spine"}, "spine"),
    ({"SeriesDescription": "pd_tse_fs_cor", "StudyDescription": "MR KNEE LEFT"}, "knee"),
    ({"SeriesDescription": "t2_tse_sag", "StudyDescription": "Lumbar spine"}, "spine"),
    ({"StudyDescription": "MRI RIGHT SHOULDER"}, "shoulder"),
    ({"StudyDescription": "MR prostate mpMRI"}, "prostate"),
    ({"SeriesDescription": "t2_tse_tra"}, "unknown"),
    ({}, "unknown"),
])
def test_body_region(tags: dict, region: str) -> None:
    assert infer_body_region(tags) == region


@pytest.mark.parametrize(("raw", "vendor"), [
    ("SIEMENS", "Siemens"), ("Siemens Healthineers", "Siemens"), ("GE MEDICAL SYSTEMS", "GE"),
    ("GE Healthcare", "GE"), ("Philips Medical Systems", "Philips"), ("Philips", "Philips"),
    ("TOSHIBA_MEC", "Canon"), ("Canon Medical Systems", "Canon"), ("Hitachi Medical Corporation", "Hitachi"),
    ("FUJIFILM Healthcare", "Hitachi"), ("Esaote", "Esaote"), ("General Electric", "GE"), ("", None), (None, None),
    ("Gemstone Imaging", "Gemstone Imaging"),  # starts with "ge" but is not GE
])
def test_vendor(raw: str | None, vendor: str | None) -> None:
    assert normalise_vendor(raw) == vendor


@pytest.mark.parametrize(("age", "birth", "study", "years"), [
    ("045Y", None, None, 45.0), ("006M", None, None, 0.5), ("014W", None, None, 14 * 7 / 365.25),
    ("010D", None, None, 10 / 365.25), ("", "19800101", "20200101", 40.0), (None, None, "20200101", None),
    ("abc", None, None, None),
])
def test_age(age: str | None, birth: str | None, study: str | None, years: float | None) -> None:
    got = parse_age(age, birth, study)
    assert got == pytest.approx(years, abs=0.01) if years is not None else got is None


@pytest.mark.parametrize(("raw", "sex"), [("M", "M"), ("f", "F"), ("O", "O"), ("", None), ("X", None), (None, None)])
def test_sex(raw: str | None, sex: str | None) -> None:
    assert normalise_sex(raw) == sex


@pytest.mark.parametrize(("columns", "axis", "tilt", "plane"), [
    ([[1, 0, 0], [0, 1, 0]], 0, 0, "axial"),
    ([[0, 1, 0], [0, 0, 1]], 0, 0, "sagittal"),
    ([[1, 0, 0], [0, 0, 1]], 0, 0, "coronal"),
    ([[1, 0, 0], [0, 1, 0]], 0, 14, "axial"),  # inside the 15 degree threshold
    ([[1, 0, 0], [0, 1, 0]], 0, 16, "oblique"),  # just past it
    ([[0, 1, 0], [0, 0, 1]], 2, 14, "sagittal"),
    ([[0, 1, 0], [0, 0, 1]], 2, 40, "oblique"),
    ([[1, 0, 0], [0, 0, 1]], 0, 20, "oblique"),
])
def test_plane(columns: list, axis: int, tilt: float, plane: str) -> None:
    affine = np.eye(4)
    i, j = (np.array(c, dtype=float) for c in columns)
    affine[:3, :3] = rotation(axis, tilt) @ np.stack([i, j, np.cross(i, j)], axis=1) @ np.diag([0.5, 0.7, 3.0])
    assert infer_plane(affine) == plane


def test_series_metadata_has_every_contract_key_with_plain_types() -> None:
    tags = {"SeriesInstanceUID": "1.2.3", "PatientAge": "045Y", "PatientSex": "F", "StudyDate": "20240131",
            "Manufacturer": "SIEMENS", "MagneticFieldStrength": 15000, "SeriesDescription": "t2_tse_tra",
            "BodyPartExamined": "HEAD", "EchoTime": 90, "ContrastBolusAgent": "none"}
    meta = series_metadata(tags, np.diag([0.5, 0.6, 3.0, 1.0]), (10, 12, 4), n_files=4, transfer_syntax_uid=None)
    expected_keys = {
        "series_instance_uid", "study_instance_uid", "accession_number", "patient_id", "patient_age", "patient_sex",
        "study_date", "modality", "manufacturer", "model", "field_strength", "series_description",
        "study_description", "sequence_family", "body_region", "plane", "voxel_size", "shape", "echo_time",
        "repetition_time", "inversion_time", "b_value", "contrast_agent", "transfer_syntax_uid", "n_files",
    }
    assert set(meta) == expected_keys
    assert meta["field_strength"] == pytest.approx(1.5)  # written in gauss
    assert (meta["study_date"], meta["manufacturer"], meta["contrast_agent"]) == ("2024-01-31", "Siemens", None)
    assert (meta["sequence_family"], meta["body_region"], meta["plane"]) == ("T2", "brain", "axial")
    assert meta["voxel_size"] == [0.5, 0.6, 3.0] and meta["shape"] == [10, 12, 4]
    assert meta["study_instance_uid"] is None
