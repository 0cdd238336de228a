"""dcm2niix as a reference reader for load_series (not a test module).

Chris Rorden's dcm2niix is the converter most neuroimaging pipelines trust to
turn DICOM into NIfTI. :func:`agreement` puts one of its NIfTI volumes beside
the fedmri :class:`~fedmri.data.Volume` read from the same files and measures
how far apart they are, in fedmri's voxel order: dcm2niix stores rows
bottom-up and may permute axes (a sagittal 3D acquisition comes out with its
slice axis first), so its voxel axes are first reordered and flipped onto
fedmri's, using the two affines, and its affine is carried along.

:data:`CASES` are the inputs compared: real scanner files (nibabel's Siemens
mosaic DWI, its Philips Enhanced MR 3D T1, pydicom's single slices) and
series written by :mod:`fedmri.simulations.dicom_writer` (plain, oblique,
multi-echo; classic and Enhanced MR). :data:`REFUSED` are inputs that
dcm2niix converts but fedmri refuses, each with the reason.

Used by ``tests/common/data/test_dcm2niix_agreement.py`` and
``benchmarks/dcm2niix_agreement.py``.
"""

from __future__ import annotations

import gzip
import io
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.data import get_testdata_file

from fedmri.data.dicom import SeriesError, group_series, load_series, scan_folder, split_key
from fedmri.data.volume import Volume
from fedmri.simulations.dicom_writer import write_multi_echo, write_series

from helpers.geometry import PLANES

NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
SHAPE = (20, 14, 7)  # synthetic series: non-square, so an i/j swap shows
SPACING = (0.7, 0.9, 2.5)
ECHO_TIMES = (12.0, 30.0, 48.0)


def find_dcm2niix() -> str | None:
    """The dcm2niix binary: the one the `dcm2niix` PyPI package put beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "dcm2niix"
    return str(beside) if beside.is_file() else shutil.which("dcm2niix")


def dcm2niix_volumes(folder: Path, out: Path, options: tuple[str, ...] = ()) -> dict[str, nib.Nifti1Image]:
    """Convert ``folder`` (one series) with dcm2niix; its 3D volumes keyed by fedmri's volume part.

    dcm2niix writes one NIfTI per echo (``-f %s_%e``: ``<series>_<echo number>``)
    and stacks diffusion volumes in 4D with a ``.bval`` file beside. The keys
    are fedmri's (:mod:`fedmri.data.dicom_split`): "" for a series of one volume,
    ``b<value>`` for diffusion, ``e<n>`` for echoes. Siemens overlays, which
    dcm2niix writes as extra ``_ROI<n>`` images, are not volumes of the series.

    Raises:
        RuntimeError: dcm2niix is missing or failed (its output in the message).
    """
    exe = find_dcm2niix()
    if exe is None:
        raise RuntimeError("dcm2niix not found: pip install -e '.[test]'")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([exe, "-z", "n", "-b", "n", "-f", "%s_%e", *options, "-o", str(out), str(folder)],
                          capture_output=True, text=True, timeout=120, check=False)
    paths = [p for p in sorted(out.glob("*.nii")) if "_ROI" not in p.name]
    if done.returncode != 0 or not paths:
        raise RuntimeError(f"dcm2niix failed on {folder} (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    volumes: dict[str, nib.Nifti1Image] = {}
    for path in paths:
        image = nib.load(path)
        bvals = path.with_suffix(".bval")
        n = image.shape[3] if image.ndim == 4 else 1
        for t in range(n):
            three_d = image.slicer[..., t] if image.ndim == 4 else image
            if bvals.is_file() and n > 1:
                part = f"b{int(round(float(bvals.read_text().split()[t])))}"
            elif len(paths) > 1:
                part = f"e{path.stem.split('_')[1]}"
            else:
                part = ""
            volumes[part] = three_d
    return volumes


def fedmri_volumes(folder: Path) -> dict[str, Volume]:
    """Every volume of the one series in ``folder``, as fedmri indexes and loads it, keyed by part."""
    headers, skipped = scan_folder(folder)
    volumes, dropped = group_series(headers)
    if skipped or dropped:
        raise ValueError(f"fedmri left out files of {folder}: {skipped + dropped}")
    if len({split_key(key)[0] for key in volumes}) != 1:
        raise ValueError(f"{folder} holds {len(volumes)} series; a case is one series")
    return {split_key(key)[1]: load_series([h.path for h in members], volume=split_key(key)[1] or None)
            for key, members in volumes.items()}


def fedmri_refusal(folder: Path) -> str | None:
    """Why fedmri does not read the series in ``folder`` (a skipped file or a SeriesError); None if it does."""
    headers, skipped = scan_folder(folder)
    if skipped:
        return "; ".join(s.reason for s in skipped)
    try:
        fedmri_volumes(folder)
    except SeriesError as exc:
        return str(exc)
    return None


@dataclass
class Agreement:
    """How far dcm2niix's reading of a volume is from fedmri's.

    Attributes:
        shape_fedmri: fedmri's (I, J, K).
        shape_dcm2niix: dcm2niix's, in its own voxel order.
        affine_diff: max |fedmri - dcm2niix| over the affine's top 3x4, once
            dcm2niix's voxel axes are put in fedmri's order (mm); inf if the
            shapes differ even then.
        pixel_diff: max |fedmri - dcm2niix| over voxels (rescaled values); inf likewise.
        correlation: Pearson correlation of the voxel values (nan for a constant volume).
        value_max: max |value| of fedmri's volume, the scale for ``pixel_diff``.
    """

    shape_fedmri: tuple[int, ...]
    shape_dcm2niix: tuple[int, ...]
    affine_diff: float
    pixel_diff: float
    correlation: float
    value_max: float


def in_fedmri_order(image: nib.Nifti1Image, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image``'s rescaled voxels and affine with its voxel axes permuted and flipped onto those of ``affine``."""
    data = image.get_fdata()  # float64, scl_slope / scl_inter applied
    transform = ornt_transform(io_orientation(image.affine), io_orientation(affine))
    return apply_orientation(data, transform), image.affine @ inv_ornt_aff(transform, data.shape)


def agreement(volume: Volume, image: nib.Nifti1Image) -> Agreement:
    """Compare fedmri's ``volume`` with dcm2niix's ``image`` of the same voxels."""
    data, affine = in_fedmri_order(image, volume.affine)
    fed = volume.array.astype(np.float64)
    same = data.shape == fed.shape
    correlation = float("nan")
    if same and np.ptp(fed) > 0 and np.ptp(data) > 0:
        correlation = float(np.corrcoef(fed.ravel(), data.ravel())[0, 1])
    return Agreement(
        shape_fedmri=volume.shape,
        shape_dcm2niix=tuple(int(s) for s in image.shape),
        affine_diff=float(np.max(np.abs(affine[:3] - volume.affine[:3]))) if same else math.inf,
        pixel_diff=float(np.max(np.abs(data - fed))) if same else math.inf,
        correlation=correlation,
        value_max=float(np.max(np.abs(fed))),
    )


# ---------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Case:
    """One series to read with both converters.

    Attributes:
        name: short id (test ids, the benchmark's rows).
        write: puts the series' files in the given (new) folder.
        parts: fedmri's volume parts the series must hold.
        options: extra dcm2niix options.
        affine_tol: largest :attr:`Agreement.affine_diff` that counts as agreement (mm).
    """

    name: str
    write: Callable[[Path], None]
    parts: tuple[str, ...] = ("",)
    options: tuple[str, ...] = ()
    affine_tol: float = 1e-4


def synthetic_volume(plane: str, seed: int) -> Volume:
    """A random volume (stored as uint16 with a non-trivial RescaleSlope) on a grid in ``plane``."""
    affine = np.eye(4)
    affine[:3, :3] = PLANES[plane] @ np.diag(SPACING)
    affine[:3, 3] = [12.3, -45.6, 78.9]
    return Volume(np.random.default_rng(seed).normal(300.0, 50.0, SHAPE).astype(np.float32), affine)


def _series(plane: str, enhanced: bool) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        write_series(folder, synthetic_volume(plane, seed=len(plane)), {"SeriesDescription": f"t2_{plane}"},
                     enhanced=enhanced, rng=np.random.default_rng(0))
    return write


def _multi_echo(enhanced: bool) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        echoes = [synthetic_volume("oblique", seed=10 + e) for e in range(len(ECHO_TIMES))]
        write_multi_echo(folder, echoes, ECHO_TIMES, {"SeriesDescription": "me_gre"}, enhanced=enhanced,
                         rng=np.random.default_rng(0))
    return write


def _with_random_pixels(source: Path | bytes, target: Path, seed: int) -> None:
    """``source`` with its pixel values replaced by random ones of the same type and bit depth.

    nibabel's scanner files come with their pixel data zeroed (to keep them
    small), which would make a pixel comparison vacuous; the header, hence
    the geometry, mosaic layout and rescale, stays the scanner's.
    """
    ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    stored = ds.pixel_array
    high = 2 ** int(ds.BitsStored)
    fresh = np.random.default_rng(seed).integers(0, high, stored.shape).astype(stored.dtype)
    ds.PixelData = fresh.astype(fresh.dtype.newbyteorder("<")).tobytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)


def _siemens_mosaic(folder: Path) -> None:
    for seed, b in enumerate(("0", "1000")):  # one series, a b=0 and a b=1000 mosaic of 48 slices
        raw = gzip.decompress((NIBABEL_DATA / f"siemens_dwi_{b}.dcm.gz").read_bytes())
        _with_random_pixels(raw, folder / f"IM{seed}", seed)


def _philips_enhanced(folder: Path) -> None:
    raw = gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes())  # 176 sagittal frames
    _with_random_pixels(raw, folder / "IM0", seed=2)


def _copy(name: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        source = get_testdata_file(name)
        if source is None:
            raise FileNotFoundError(f"{name} is in neither pydicom's nor pydicom-data's test files")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / "IM0")
    return write


CASES = (
    # Philips: dcm2niix's default (-p y) reports Philips' "precise" floating-point values,
    # stored / MRScaleSlope (a private tag); -p n gives the DICOM RescaleSlope/Intercept
    # values that fedmri (and every standard reader) returns.
    Case("philips-enhanced-3d", _philips_enhanced, options=("-p", "n")),
    # The first tile sits 384 pixels (690 mm) from the mosaic's corner along the row and
    # column cosines, which the header gives to 6 decimals (|column| = 1 - 3e-7): the
    # header fixes the origin only to ~690 mm x 5e-7 = 3.5e-4 mm. nibabel (hence fedmri)
    # uses the cosines as written, dcm2niix normalises them and computes in float32;
    # the origins differ by 2.5e-4 mm, 1/7000 of a voxel.
    Case("siemens-mosaic-dwi", _siemens_mosaic, parts=("b0", "b1000"), affine_tol=5e-4),
    Case("siemens-1-slice", _copy("MR-SIEMENS-DICOM-WithOverlays.dcm")),
    Case("philips-1-slice", _copy("MR2_UNCR.dcm"), options=("-p", "n")),
    Case("toshiba-1-slice", _copy("MR_small.dcm")),
    *(Case(f"{plane}-{'enhanced' if enhanced else 'classic'}", _series(plane, enhanced))
      for plane in PLANES for enhanced in (False, True)),
    *(Case(f"multi-echo-{'enhanced' if enhanced else 'classic'}", _multi_echo(enhanced),
           parts=tuple(f"e{n + 1}" for n in range(len(ECHO_TIMES))))
      for enhanced in (False, True)),
)


@dataclass(frozen=True)
class Refused:
    """An input dcm2niix converts and fedmri refuses, on purpose.

    Attributes:
        name: short id.
        write: as :attr:`Case.write`.
        error: regex that fedmri's message matches.
        why: what dcm2niix makes of it instead.
    """

    name: str
    write: Callable[[Path], None]
    error: str
    why: str


def _nibabel_file(name: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(NIBABEL_DATA / name, folder / "IM0")
    return write


REFUSED = (
    Refused("resized-mosaic", _nibabel_file("0.dcm"), r"48 slices in 7x7 tiles does not fit its 256x256",
            "a 128x128-tile mosaic shrunk to 256x256 pixels: dcm2niix cuts 36x36 tiles (7 x 36 = 252 of 256 "
            "columns), so its slices straddle tile borders"),
    Refused("enhanced-without-geometry", _copy("emri_small.dcm"), r"missing or invalid PixelSpacing",
            "an Enhanced MR file stripped of its functional groups (no PixelSpacing, orientation or position): "
            "dcm2niix warns and writes a made-up grid, identity orientation and 1 mm pixels"),
    Refused("no-sop-instance-uid", _nibabel_file("decimal_rescale.dcm"), r"missing or invalid SOPInstanceUID",
            "a header without SOPInstanceUID (Type 1): dcm2niix converts it regardless"),
)
