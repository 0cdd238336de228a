"""3D mask generator and the batch mask sampler."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fedmri.config import load_config
from fedmri.ssl import MaskingGenerator3D, build_mask_generator, sample_masks


@pytest.mark.parametrize("mode", ["block", "random"])
@pytest.mark.parametrize("grid", [(4, 4, 4), (6, 6, 6), (2, 3, 5)])
def test_exact_count_on_the_grid(mode: str, grid: tuple[int, int, int]) -> None:
    gen = MaskingGenerator3D(grid, mode=mode)
    rng = np.random.default_rng(0)
    for n in [0, 1, gen.num_patches // 3, gen.num_patches // 2, gen.num_patches]:
        mask = gen(n, rng)
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() == n


def test_block_masks_are_more_compact_than_random() -> None:
    # Same count, fewer connected pieces: blocks are boxes, random is scattered.
    rng = np.random.default_rng(0)
    pieces = {}
    for mode in ("block", "random"):
        gen = MaskingGenerator3D((6, 6, 6), mode=mode)
        pieces[mode] = np.mean([ndimage.label(gen(60, rng))[1] for _ in range(30)])
    assert pieces["block"] < 0.5 * pieces["random"], pieces


def test_reproducible_with_a_seeded_generator() -> None:
    gen = MaskingGenerator3D((6, 6, 6))
    a = gen(40, np.random.default_rng(3))
    b = gen(40, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_sample_masks_fraction_ratios_and_order() -> None:
    gen = MaskingGenerator3D((4, 4, 4))
    masks = sample_masks(16, gen, probability=0.5, ratio_range=(0.1, 0.5), rng=np.random.default_rng(0))
    assert masks.shape == (16, 64) and masks.dtype.is_floating_point is False
    counts = masks.sum(1).numpy()
    assert (counts > 0).sum() == 8
    ratios = np.sort(counts[counts > 0]) / 64
    assert ratios.min() >= 0.1 - 1 / 64 and ratios.max() <= 0.5
    # One draw per sub-interval of [0.1, 0.5]: the masked ratios are spread out.
    assert ratios.max() - ratios.min() > 0.25
    # Shuffled: the masked crops are not simply the first eight.
    assert not (counts[:8] > 0).all()


def test_sample_masks_zero_probability() -> None:
    masks = sample_masks(4, MaskingGenerator3D((2, 2, 2)), probability=0.0)
    assert not masks.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(grid=(4, 4)), "grid"), (dict(grid=(4, 0, 4)), "grid"), (dict(mode="grid"), "mode"),
     (dict(min_num_patches=0), "min_num_patches"), (dict(min_aspect=0.0), "min_aspect")],
)
def test_illegal_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskingGenerator3D(**({"grid": (4, 4, 4)} | kwargs))


def test_illegal_requests() -> None:
    gen = MaskingGenerator3D((2, 2, 2))
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(9)
    with pytest.raises(ValueError, match="ratio_range"):
        sample_masks(4, gen, ratio_range=(0.6, 0.2))
    with pytest.raises(ValueError, match="probability"):
        sample_masks(4, gen, probability=1.5)


def test_build_mask_generator_from_config() -> None:
    gen = build_mask_generator(load_config("base"))
    assert gen.grid == (6, 6, 6) and gen.mode == "block"
    assert build_mask_generator(load_config("tiny", overrides=["ssl.mask_mode=random"])).mode == "random"
    with pytest.raises(ValueError, match="global_crops_size"):
        build_mask_generator(load_config("tiny", overrides=["ssl.global_crops_size=40"]))
