"""Turn a series into a model input once, and keep the result in an on-disk cache.

The chain: percentile intensity scaling (numpy's selection-based percentile:
``ScaleIntensityRangePercentiles`` sorts the whole volume with ``torch.quantile``,
which was most of the indexing time; done on the voxels as acquired, so padding
and resampling do not shift the percentiles), then MONAI's ``Orientation`` to the
configured axis codes, ``Spacing`` to the target voxel size (bilinear for the
image, nearest for a mask; outside the field of view is 0 = the low percentile),
then a centred ``ResizeWithPadOrCrop`` to the target shape. The affine travels
with the data as a ``MetaTensor``, so the output affine is exact and a voxel of
the result can be placed in RAS+ millimetres.

Cache entries are content addressed: the key hashes the voxels, the affine, the
mask and every preprocessing setting, so a change of any of them makes a new
entry, and unchanged inputs are never preprocessed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

from fedmri.data.volume import Volume
from fedmri.errors import ConfigError, InputError

# Bump when the chain changes in a way that changes outputs: old entries then miss.
PREPROCESS_VERSION = 1
CACHE_DTYPES = ("float16", "float32")
# Volume is RAS+ (nibabel); MONAI's default labels would otherwise warn.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessSettings:
    """Validated copy of ``cfg.data.preprocess``; every field is part of the cache key.

    Args:
        orientation: Axis codes to reorient to, e.g. ``"RAS"``.
        target_spacing: Output voxel size in mm along the three output axes.
        target_shape: Output grid after centred crop or pad.
        intensity_percentiles: (low, high) percentiles mapped to 0 and 1, clipped.
        cache_dtype: ``"float16"`` (default) or ``"float32"`` for the cached image.
    """

    orientation: str = "RAS"
    target_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    target_shape: tuple[int, int, int] = (96, 96, 96)
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    cache_dtype: str = "float16"

    def __post_init__(self) -> None:
        codes = str(self.orientation).upper()
        if sorted(_axis_of(c) for c in codes) != [0, 1, 2]:
            raise ConfigError(f"data.preprocess.orientation={self.orientation!r} must name each axis once, e.g. 'RAS'")
        if len(self.target_spacing) != 3 or not all(float(s) > 0 for s in self.target_spacing):
            raise ConfigError(
                f"data.preprocess.target_spacing={list(self.target_spacing)} must be 3 positive mm values")
        if len(self.target_shape) != 3 or not all(int(s) >= 1 for s in self.target_shape):
            raise ConfigError(f"data.preprocess.target_shape={list(self.target_shape)} must be 3 positive integers")
        bounds = [float(p) for p in self.intensity_percentiles]
        if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1] <= 100.0:
            raise ConfigError(
                f"data.preprocess.intensity_percentiles={bounds} must be [low, high] with 0 <= low < high <= 100"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"data.preprocess.cache_dtype={self.cache_dtype!r} must be one of {', '.join(CACHE_DTYPES)}")
        object.__setattr__(self, "orientation", codes)
        object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
        object.__setattr__(self, "target_shape", tuple(int(s) for s in self.target_shape))
        object.__setattr__(self, "intensity_percentiles", tuple(bounds))

    @classmethod
    def from_config(cls, section: Any) -> PreprocessSettings:
        """Build from ``cfg.data.preprocess`` (a DictConfig or ``PreprocessConfig``)."""
        return cls(
            orientation=section.orientation,
            target_spacing=tuple(section.target_spacing),
            target_shape=tuple(section.target_shape),
            intensity_percentiles=tuple(section.intensity_percentiles),
            cache_dtype=section.cache_dtype,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types, with the chain version, as stored in the catalog."""
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
                "version": PREPROCESS_VERSION}

    def digest(self) -> str:
        """sha256 of the canonical JSON of :meth:`as_dict`."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(code, -1)


@dataclass
class Preprocessed:
    """A model-ready series.

    Attributes:
        image: float array (1, X, Y, Z), intensities in [0, 1].
        affine: 4x4 float64 voxel -> RAS+ mm transform of the output grid.
        mask: uint8 label array (1, X, Y, Z) on the same grid (0 = background,
            other values as in the input mask), or ``None``.
    """

    image: np.ndarray
    affine: np.ndarray
    mask: np.ndarray | None = None


class Preprocessor:
    """Reorient, resample, scale and crop/pad a :class:`Volume` (and its mask).

    Args:
        settings: What to produce; see :class:`PreprocessSettings`.
    """

    def __init__(self, settings: PreprocessSettings) -> None:
        self.settings = settings
        self._orient = Orientation(axcodes=settings.orientation, labels=_RAS_LABELS)
        self._spacing_image = Spacing(pixdim=settings.target_spacing, mode="bilinear", padding_mode="zeros")
        self._spacing_mask = Spacing(pixdim=settings.target_spacing, mode="nearest", padding_mode="zeros")
        self._crop_pad = ResizeWithPadOrCrop(settings.target_shape)

    def __call__(self, volume: Volume, mask: Volume | None = None) -> Preprocessed:
        """Preprocess one series.

        Args:
            volume: The series as read; its affine gives the geometry.
            mask: Optional lesion mask (integer labels 0..255) on exactly the volume's voxel grid.

        Returns:
            The image (and mask) on the target grid with its affine.

        Raises:
            InputError: If the mask's shape or affine differs from the volume's.
        """
        if mask is not None:
            check_same_grid(volume, mask)
        scaled = scale_percentiles(volume.array, *self.settings.intensity_percentiles)  # I, J, K
        image = MetaTensor(torch.from_numpy(scaled)[None], affine=torch.from_numpy(volume.affine))  # 1, I, J, K
        image = self._spatial(image, self._spacing_image)
        out_mask = None
        if mask is not None:
            # Label values survive (0 background, 1..255 lesion classes): nearest never mixes them.
            codes = np.clip(np.rint(np.asarray(mask.array, dtype=np.float32)), 0, 255)  # I, J, K
            warped = self._spatial(MetaTensor(torch.from_numpy(codes)[None], affine=torch.from_numpy(mask.affine)),
                                   self._spacing_mask)
            out_mask = np.rint(warped.array).astype(np.uint8)  # 1, X, Y, Z
        return Preprocessed(
            image=np.asarray(image.array, dtype=np.float32),  # 1, X, Y, Z
            affine=np.asarray(image.affine, dtype=np.float64),
            mask=out_mask,
        )

    def _spatial(self, item: MetaTensor, spacing: Spacing) -> MetaTensor:
        return self._crop_pad(spacing(self._orient(item)))  # type: ignore[return-value]


def scale_percentiles(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the ``low``/``high`` percentiles to 0/1 and clip; a constant array gives zeros.

    Args:
        array: voxel values as acquired.
        low: lower percentile in [0, 100).
        high: upper percentile in (low, 100].
    """
    values = np.asarray(array, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def check_same_grid(volume: Volume, mask: Volume, tol_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` unless ``mask`` lies on ``volume``'s voxel grid."""
    if mask.shape != volume.shape:
        raise InputError(f"mask shape {list(mask.shape)} differs from the series shape {list(volume.shape)}; "
                         "the mask must be drawn on the series' own voxel grid")
    if not np.allclose(mask.affine, volume.affine, atol=tol_mm):
        raise InputError("mask affine differs from the series affine by more than "
                         f"{tol_mm} mm; the mask must be drawn on the series' own voxel grid")


def cache_key(volume: Volume, settings: PreprocessSettings, mask: Volume | None = None) -> str:
    """sha256 over the voxels, affine, mask and preprocessing settings.

    Two series with identical content share an entry wherever their files lie.
    """
    h = hashlib.sha256(b"fedmri-preprocess\0")
    h.update(settings.digest().encode())
    for item in (volume, mask):
        if item is None:
            h.update(b"\0none")
            continue
        array = np.ascontiguousarray(item.array, dtype=np.float32)
        h.update(repr(array.shape).encode())
        h.update(array.tobytes())
        h.update(np.ascontiguousarray(item.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


class VolumeCache:
    """Preprocessed series on disk, one ``.npz`` per key, written atomically.

    Args:
        root: Folder of the cache (``CATALOG_DIR/cache``); created on first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` lives (two-level fan-out keeps folders small)."""
        return self.root / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, item: Preprocessed, dtype: str = "float16") -> Path:
        """Write an entry: tmp file then ``os.replace``, so readers never see half a file."""
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype {dtype!r} must be one of {', '.join(CACHE_DTYPES)}")
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"image": item.image.astype(dtype), "affine": item.affine.astype(np.float64)}
        if item.mask is not None:
            arrays["mask"] = item.mask.astype(np.uint8)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final

    def load(self, key: str) -> Preprocessed:
        """Read an entry back (image as stored, e.g. float16)."""
        path = self.path(key)
        if not path.is_file():
            raise InputError(f"cache entry {path} is missing; run `fedmri data index` again to rebuild it")
        with np.load(path) as data:
            return Preprocessed(image=data["image"], affine=data["affine"],
                                mask=data["mask"] if "mask" in data.files else None)
