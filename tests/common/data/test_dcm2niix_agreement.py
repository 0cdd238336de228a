"""load_series agrees with dcm2niix on every case that both read (issue 17).

dcm2niix (the real binary, from the `dcm2niix` test dependency) and fedmri
read the same folder: real scanner files (a Siemens mosaic DWI and a Philips
Enhanced MR 3D T1 from nibabel, single slices from pydicom) and series
written by the project's writer (axial, sagittal, coronal, oblique, three-echo;
classic and Enhanced MR). The cases live in :mod:`helpers.dcm2niix`, which
``benchmarks/dcm2niix_agreement.py`` prints as a table.

dcm2niix's voxel axes are put in fedmri's order first (it stores rows
bottom-up and may permute axes), so shapes, affines and voxels compare one to
one. Tolerances:

- affine: 1e-4 mm over the top 3x4 (NIfTI stores it in float32, ~1e-5 mm at
  200 mm); the mosaic 5e-4 mm, the precision its header gives (see CASES);
- pixels: 1e-6 of the largest value. Both sides apply the same
  RescaleSlope/Intercept, dcm2niix through float32 scl_slope/scl_inter, fedmri
  into float32: each rounds to ~6e-8 relative, while one stored integer step
  is at least 1.5e-5 of the range, so a misplaced voxel or a wrong rescale fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.dcm2niix import (
    CASES,
    REFUSED,
    Case,
    Refused,
    agreement,
    dcm2niix_volumes,
    fedmri_refusal,
    fedmri_volumes,
    find_dcm2niix,
)

pytestmark = pytest.mark.skipif(find_dcm2niix() is None,
                                reason="dcm2niix binary not found (test dependency: pip install -e '.[test]')")

PIXEL_RTOL = 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_volumes_agree_with_dcm2niix(case: Case, tmp_path: Path) -> None:
    case.write(tmp_path / "dicom")
    ours = fedmri_volumes(tmp_path / "dicom")
    theirs = dcm2niix_volumes(tmp_path / "dicom", tmp_path / "nifti", case.options)
    assert sorted(ours) == sorted(theirs) == sorted(case.parts)
    for part, volume in ours.items():
        a = agreement(volume, theirs[part])
        assert sorted(a.shape_fedmri) == sorted(a.shape_dcm2niix), (part, a)
        assert a.affine_diff <= case.affine_tol, (part, a)
        assert a.pixel_diff <= PIXEL_RTOL * a.value_max, (part, a)
        assert a.value_max > 0  # the comparison saw real values, not an all-zero volume


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_inputs_fedmri_refuses_on_purpose(case: Refused, tmp_path: Path) -> None:
    """Inputs dcm2niix converts into something wrong or unplaceable; fedmri says why instead (``case.why``)."""
    case.write(tmp_path / "dicom")
    reason = fedmri_refusal(tmp_path / "dicom")
    assert reason is not None
    assert re.search(case.error, reason), reason
