"""fedmri's DICOM volumes beside dcm2niix's, read from the same files: shape, affine and voxels (issue 17).

Runs the cases of ``tests/helpers/dcm2niix.py`` (the ones
``tests/common/data/test_dcm2niix_agreement.py`` asserts) and prints, per
volume: both shapes (dcm2niix's in its own voxel order), the largest affine
difference once dcm2niix's voxel axes are put in fedmri's order, the largest
voxel difference (also relative to the largest value) and the voxel
correlation. Then Philips under dcm2niix's default scaling, and the inputs
fedmri refuses that dcm2niix converts::

    python benchmarks/dcm2niix_agreement.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers
from helpers.dcm2niix import (
    CASES,
    REFUSED,
    agreement,
    dcm2niix_volumes,
    fedmri_refusal,
    fedmri_volumes,
    find_dcm2niix,
    in_fedmri_order,
)


def _version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return next((line for line in (out.stdout + out.stderr).splitlines() if "version" in line), "?").strip()


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def main() -> None:
    exe = find_dcm2niix()
    if exe is None:
        raise SystemExit("dcm2niix not found: pip install -e '.[test]'")
    print(_version(exe))
    print("affine diff: max |fedmri - dcm2niix| over the top 3x4 after matching voxel axes (mm); "
          "pixel diff: max |fedmri - dcm2niix| (and / max |value|)\n")
    head = f"{'case':<22} {'vol':<6} {'fedmri':<12} {'dcm2niix':<12} {'affine mm':>10} {'tol':>7} " \
           f"{'pixel diff':>11} {'relative':>9} {'corr':>12}"
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(prefix="fedmri-dcm2niix-") as tmp:
        root = Path(tmp)
        for case in CASES:
            folder = root / case.name
            case.write(folder)
            ours = fedmri_volumes(folder)
            theirs = dcm2niix_volumes(folder, root / f"{case.name}-nifti", case.options)
            for part in sorted(set(ours) | set(theirs)):
                if part not in ours or part not in theirs:
                    print(f"{case.name:<22} {part or '-':<6} only in {'fedmri' if part in ours else 'dcm2niix'}")
                    continue
                a = agreement(ours[part], theirs[part])
                print(f"{case.name:<22} {part or '-':<6} {_shape(a.shape_fedmri):<12} {_shape(a.shape_dcm2niix):<12} "
                      f"{a.affine_diff:>10.1e} {case.affine_tol:>7.0e} {a.pixel_diff:>11.2e} "
                      f"{a.pixel_diff / a.value_max:>9.1e} {a.correlation:>12.10f}")

        # dcm2niix's default Philips scaling (-p y): "precise" values, stored / MRScaleSlope, not RescaleSlope's.
        case = CASES[0]
        volume = fedmri_volumes(root / case.name)[""]
        image = dcm2niix_volumes(root / case.name, root / "philips-default-nifti")[""]
        data, _ = in_fedmri_order(image, volume.affine)
        nonzero = volume.array != 0
        ratio = data[nonzero] / volume.array[nonzero]
        print(f"\n{case.name} with dcm2niix's default -p y: dcm2niix / fedmri = {np.median(ratio):.4f} "
              f"(spread {np.ptp(ratio):.1e}), correlation {agreement(volume, image).correlation:.10f}")

        print("\nconverted by dcm2niix, refused by fedmri:")
        for refused in REFUSED:
            folder = root / refused.name
            refused.write(folder)
            images = dcm2niix_volumes(folder, root / f"{refused.name}-nifti").values()
            shapes = ", ".join(_shape(i.shape) for i in images)
            print(f"  {refused.name:<26} dcm2niix {shapes:<10} fedmri: {fedmri_refusal(folder)}")
            print(f"  {'':<26} ({refused.why})")


if __name__ == "__main__":
    main()
