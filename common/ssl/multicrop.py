"""3D multi-crop augmentation for DINOv2-style self-supervision, with MONAI transforms.

Each volume gives 2 global crops (large, seen by student and teacher) and N
local crops (small, student only), each a random resized crop followed by
flips and MR-flavoured intensity jitter: gamma, gain and offset, noise, and a
smooth bias field (coil inhomogeneity). :func:`collate_multicrop` stacks a
batch crop-major, as DINOv2 does, and draws the iBOT masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    Randomizable,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    SpatialCrop,
    Transform,
)
from monai.utils import convert_to_tensor
from omegaconf import DictConfig
from torch import Tensor

from fedmri.ssl.masking import MaskingGenerator3D, sample_masks
from fedmri.ssl.meta_arch import N_GLOBAL_CROPS


class RandResizedCrop3D(Randomizable, Transform):
    """Crop a random box of random volume fraction and aspect, resize to a cube.

    The 3D analogue of torchvision's ``RandomResizedCrop``: the box volume is
    ``scale`` times the input volume, per-axis aspect ratios are log-uniform in
    ``ratio``; after 10 failed draws the whole volume is used.

    Args:
        size: Output edge in voxels.
        scale: (min, max) box volume as a fraction of the input volume.
        ratio: (min, max) per-axis aspect ratio.
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        if size < 1:
            raise ValueError(f"crop size must be >= 1, got {size}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop aspect ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.resize = Resize((self.size,) * 3, mode="trilinear", anti_aliasing=False)
        self._box: tuple[list[int], list[int]] = ([0, 0, 0], [0, 0, 0])

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        shape = np.asarray(spatial_shape)
        for _ in range(10):
            volume = shape.prod() * self.R.uniform(*self.scale)
            ratios = np.exp(self.R.uniform(*self.log_ratio, size=3))
            ratios /= ratios.prod() ** (1 / 3)
            edges = np.rint(volume ** (1 / 3) * ratios).astype(int)
            if np.all(edges >= 1) and np.all(edges <= shape):
                start = [int(self.R.randint(0, s - e + 1)) for s, e in zip(shape, edges)]
                self._box = (start, [s + int(e) for s, e in zip(start, edges)])
                return
        self._box = ([0, 0, 0], [int(s) for s in shape])

    def __call__(self, img: Tensor, randomize: bool = True) -> Tensor:
        # img: C, X, Y, Z
        if randomize:
            self.randomize(img.shape[1:])
        crop = SpatialCrop(roi_start=self._box[0], roi_end=self._box[1])(img)
        return self.resize(crop)  # C, size, size, size


class MultiCropAugmentation(Randomizable):
    """Turn one volume (C, X, Y, Z) into 2 global and N local augmented crops.

    Args:
        global_crops_size: Edge of the global crops.
        local_crops_size: Edge of the local crops.
        local_crops_number: Local crops per volume (0 = none).
        global_crops_scale: Volume-fraction range of global crops (DINOv2: 0.32-1).
        local_crops_scale: Volume-fraction range of local crops (DINOv2: 0.05-0.32).
        aspect_ratio: Per-axis aspect-ratio range of the crops.
        flip_prob: Probability of a flip along each axis.
        intensity_prob: Probability of each intensity jitter.
        gamma_range: Gamma range of the contrast jitter.
        intensity_scale: Gain jitter ``v * (1 + U(-s, s))``.
        intensity_shift: Offset jitter ``v + U(-s, s)``.
        noise_std: Largest standard deviation of additive Gaussian noise.
        bias_field_coeff: Largest coefficient of the degree-3 log bias field.
    """

    def __init__(
        self,
        global_crops_size: int,
        local_crops_size: int,
        local_crops_number: int,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        aspect_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        intensity_prob: float = 0.8,
        gamma_range: Sequence[float] = (0.7, 1.5),
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        noise_std: float = 0.03,
        bias_field_coeff: float = 0.2,
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        for name, p in (("flip_prob", flip_prob), ("intensity_prob", intensity_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.local_crops_number = local_crops_number
        jitter = [RandFlip(prob=flip_prob, spatial_axis=axis) for axis in range(3)] + [
            RandAdjustContrast(prob=intensity_prob, gamma=tuple(gamma_range)),
            RandScaleIntensity(factors=intensity_scale, prob=intensity_prob),
            RandShiftIntensity(offsets=intensity_shift, prob=intensity_prob),
            RandBiasField(degree=3, coeff_range=(0.0, bias_field_coeff), prob=intensity_prob),
            RandGaussianNoise(prob=intensity_prob, std=noise_std),
        ]
        self.global_view = Compose([RandResizedCrop3D(global_crops_size, global_crops_scale, aspect_ratio), *jitter])
        self.local_view = Compose([RandResizedCrop3D(local_crops_size, local_crops_scale, aspect_ratio), *jitter])

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> MultiCropAugmentation:
        super().set_random_state(seed, state)
        # One stream for all views keeps a seeded run reproducible end to end.
        self.global_view.set_random_state(state=self.R)
        self.local_view.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:  # the views draw their own numbers
        pass

    def __call__(self, volume: Tensor | np.ndarray) -> dict[str, list[Tensor]]:
        """Crops of one volume.

        Args:
            volume: (C, X, Y, Z) intensities scaled to about [0, 1].

        Returns:
            ``{"global_crops": [2 x (C, G, G, G)], "local_crops": [N x (C, L, L, L)]}``.
        """
        if volume.ndim != 4:
            raise ValueError(f"expected one volume (C, X, Y, Z), got shape {tuple(volume.shape)}")
        volume = torch.as_tensor(volume, dtype=torch.float32)

        def view(t: Compose) -> Tensor:
            return convert_to_tensor(t(volume), track_meta=False, dtype=torch.float32)

        # Crops need no affine bookkeeping; without MONAI's MetaTensor the
        # same transforms (and random draws) run ~1.8x faster.
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return {
                "global_crops": [view(self.global_view) for _ in range(N_GLOBAL_CROPS)],
                "local_crops": [view(self.local_view) for _ in range(self.local_crops_number)],
            }
        finally:
            set_track_meta(tracking)


def build_multicrop(cfg: DictConfig) -> MultiCropAugmentation:
    """The multi-crop augmentation that ``cfg.ssl`` (or a whole config) describes."""
    s = cfg.ssl if "ssl" in cfg else cfg
    return MultiCropAugmentation(
        global_crops_size=s.global_crops_size,
        local_crops_size=s.local_crops_size,
        local_crops_number=s.local_crops_number,
        global_crops_scale=tuple(s.global_crops_scale),
        local_crops_scale=tuple(s.local_crops_scale),
        aspect_ratio=tuple(s.crops_aspect_ratio),
        flip_prob=s.flip_prob,
        intensity_prob=s.intensity_prob,
        gamma_range=tuple(s.gamma_range),
        intensity_scale=s.intensity_scale,
        intensity_shift=s.intensity_shift,
        noise_std=s.noise_std,
        bias_field_coeff=s.bias_field_coeff,
    )


def collate_multicrop(
    samples: Sequence[dict[str, list[Tensor]]],
    mask_generator: MaskingGenerator3D | None = None,
    mask_probability: float = 0.5,
    mask_ratio_range: Sequence[float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
) -> dict[str, Tensor | None]:
    """Stack crops crop-major (all samples' crop 0, then crop 1, ...) and draw masks.

    Args:
        samples: Outputs of :class:`MultiCropAugmentation`.
        mask_generator: Generator on the global crops' patch grid; None = no masks.
        mask_probability: Fraction of global crops that get a mask.
        mask_ratio_range: (min, max) masked fraction.
        rng: Random generator for the masks.

    Returns:
        ``{"global_crops": (2B, C, G, G, G), "local_crops": (NB, C, L, L, L) or
        None, "masks": (2B, n_patches) bool or None}``.
    """
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    local_crops = (torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
                   if n_local else None)
    masks = None
    if mask_generator is not None:
        masks = sample_masks(len(global_crops), mask_generator, mask_probability, mask_ratio_range, rng)
    return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks}
