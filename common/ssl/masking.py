"""Masks on the 3D patch grid for masked image modelling (iBOT, DINOv2).

Block masks are BEiT's rectangle masking grown to boxes: a few boxes of random
volume and aspect, placed at random, until the requested count is reached. On
the small grids of 3D crops (4^3 or 6^3 patches) boxes often cannot hit the
count exactly, so the remainder is filled with random patches: the masked
ratio is then exactly what was asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

MASK_MODES = ("block", "random")


class MaskingGenerator3D:
    """Draw a boolean mask of a given number of patches on a (gx, gy, gz) grid.

    Args:
        grid: Patch grid of the crops to mask.
        mode: ``"block"`` (boxes, topped up at random) or ``"random"`` (patches).
        min_num_patches: Smallest box, in patches. Default 4 (BEiT: 16 in 2D).
        max_num_patches: Largest box; None = no limit beyond the request.
        min_aspect: Smallest per-axis aspect ratio of a box; the largest is its
            inverse unless ``max_aspect`` is given. Default 0.3 (BEiT).
        max_aspect: Largest per-axis aspect ratio.

    Raises:
        ValueError: For a bad grid, mode or size.
    """

    def __init__(
        self,
        grid: Sequence[int],
        mode: str = "block",
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be 3 positive sizes, got {tuple(grid)}")
        if mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.mode = mode
        self.num_patches = math.prod(self.grid)
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, num_masking_patches: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """A (gx, gy, gz) bool mask with exactly ``num_masking_patches`` True.

        Raises:
            ValueError: If the count is negative or exceeds the grid.
        """
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        if self.mode == "block":
            while count < num_masking_patches:
                delta = self._add_box(mask, min(num_masking_patches - count, self.max_num_patches), rng)
                if delta == 0:
                    break
                count += delta
        if count < num_masking_patches:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, size=num_masking_patches - count, replace=False)] = True
        return mask

    def _add_box(self, mask: np.ndarray, max_patches: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            volume = rng.uniform(self.min_num_patches, max(self.min_num_patches, max_patches))
            ratios = np.exp(rng.uniform(*self.log_aspect, size=3))
            ratios /= ratios.prod() ** (1 / 3)  # aspect only; the volume comes from `volume`
            edges = np.rint(volume ** (1 / 3) * ratios).astype(int)
            if np.any(edges < 1) or np.any(edges > self.grid):
                continue
            start = [rng.integers(0, g - e + 1) for g, e in zip(self.grid, edges)]
            box = tuple(slice(s, s + e) for s, e in zip(start, edges))
            new = int(edges.prod()) - int(mask[box].sum())
            if 0 < new <= max_patches:
                mask[box] = True
                return new
        return 0


def sample_masks(
    n_images: int,
    generator: MaskingGenerator3D,
    probability: float = 0.5,
    ratio_range: Sequence[float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Masks for a batch of global crops, as DINOv2's collate draws them.

    ``int(n_images * probability)`` crops are masked; their ratios are spread
    evenly over ``ratio_range`` (one sub-interval each), the rest get empty
    masks, and the order is shuffled.

    Args:
        n_images: Number of crops (n_global_crops * batch size).
        generator: Mask generator for the crops' patch grid.
        probability: Fraction of crops that get a mask.
        ratio_range: (min, max) fraction of patches masked.
        rng: Random generator (a fresh one if None).

    Returns:
        (n_images, N) bool tensor, N = generator.num_patches, x-major order.
    """
    lo, hi = (float(r) for r in ratio_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= min <= max <= 1, got {tuple(ratio_range)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    rng = rng if rng is not None else np.random.default_rng()
    n = generator.num_patches
    n_masked = int(n_images * probability)
    edges = np.linspace(lo, hi, n_masked + 1)
    masks = [generator(int(n * rng.uniform(edges[i], edges[i + 1])), rng) for i in range(n_masked)]
    masks += [np.zeros(generator.grid, dtype=bool)] * (n_images - n_masked)
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack([masks[i].reshape(-1) for i in order]))


def build_mask_generator(cfg: DictConfig) -> MaskingGenerator3D:
    """The generator for the global crops that a whole config describes.

    Raises:
        ValueError: If ``ssl.global_crops_size`` is not a multiple of
            ``model.patch_size`` or ``ssl.mask_mode`` is unknown.
    """
    size, patch = cfg.ssl.global_crops_size, cfg.model.patch_size
    if size < patch or size % patch:
        raise ValueError(f"ssl.global_crops_size={size} must be a positive multiple of model.patch_size={patch}")
    return MaskingGenerator3D((size // patch,) * 3, mode=cfg.ssl.mask_mode)
