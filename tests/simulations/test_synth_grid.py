"""affine_resample: bit for bit scipy's linear affine_transform with edge values, for all channels at once."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fedmri.simulations.synth.grid import affine_resample


def _scipy(maps: np.ndarray, m: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return np.stack([ndimage.affine_transform(maps[..., c], m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1,
                                              mode="nearest").reshape(-1) for c in range(maps.shape[3])])


@pytest.mark.parametrize("seed", range(6))
def test_matches_scipy_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    maps = rng.normal(0.0, 10.0, (13, 11, 9, 3)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    m = np.eye(4)
    m[:3, :3] = q * rng.uniform(0.3, 1.5, 3)
    m[:3, 3] = rng.normal(5.0, 6.0, 3)  # partly outside the grid: edge values
    shape = (7, 8, 6)
    got = affine_resample(maps, m, shape, chunk=int(rng.integers(1, 200)))
    assert got.dtype == np.float32 and got.shape == (3, 7 * 8 * 6)
    assert got.tobytes() == _scipy(maps, m, shape).tobytes()


def test_grid_points_and_the_last_voxel_are_exact() -> None:
    maps = np.random.default_rng(0).random((6, 5, 4, 2), dtype=np.float32)
    m = np.eye(4)
    m[:3, 3] = [2.0, 1.0, 0.0]  # output reaches the last voxel along every axis
    got = affine_resample(maps, m, (4, 4, 4))
    assert got.tobytes() == _scipy(maps, m, (4, 4, 4)).tobytes()
    np.testing.assert_array_equal(got[:, -1], maps[5, 4, 3])
