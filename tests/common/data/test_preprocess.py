"""Preprocessing geometry, intensity scaling and the content-addressed cache."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.config import load_config
from fedmri.data.preprocess import (
    PreprocessSettings,
    Preprocessor,
    VolumeCache,
    cache_key,
)
from fedmri.data.volume import Volume
from fedmri.errors import ConfigError, InputError

SETTINGS = PreprocessSettings(target_spacing=(3.0, 3.0, 3.0), target_shape=(32, 32, 32))


def _oblique_sagittal_affine() -> np.ndarray:
    """An LPS-like sagittal stack, slightly rotated about z, anisotropic voxels."""
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    # i -> posterior, j -> inferior, k -> right-to-left ... flipped on purpose.
    axes = np.array([[0, 0, -4.0], [-0.8, 0, 0], [0, -0.9, 0]])  # rows x,y,z; columns i,j,k
    affine = np.eye(4)
    affine[:3, :3] = rot @ axes
    affine[:3, 3] = [40.0, 60.0, 70.0]
    return affine


def _blob(affine: np.ndarray, shape: tuple[int, int, int], centre_ras: np.ndarray, sigma: float) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1)
    ras = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return np.exp(-((ras - centre_ras[:, None]) ** 2).sum(0) / (2 * sigma**2)).reshape(shape).astype(np.float32)


def _centroid_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    weights = array.astype(np.float64).reshape(-1)
    ijk = np.indices(array.shape).reshape(3, -1)
    centre = (ijk * weights).sum(1) / weights.sum()
    return affine[:3, :3] @ centre + affine[:3, 3]


@pytest.fixture(scope="module")
def marked_volume() -> tuple[Volume, np.ndarray]:
    affine = _oblique_sagittal_affine()
    shape = (16, 100, 90)
    centre = affine[:3, :3] @ np.array([7.0, 55.0, 40.0]) + affine[:3, 3]
    return Volume(_blob(affine, shape, centre, sigma=6.0) * 900.0 + 50.0, affine), centre


def test_marker_lands_where_the_output_affine_says(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, centre = marked_volume
    out = Preprocessor(SETTINGS)(volume)
    assert out.image.shape == (1, 32, 32, 32)
    # Background is 0 after scaling; the blob alone carries the weight.
    found = _centroid_ras(np.clip(out.image[0] - 0.05, 0, None), out.affine)
    assert np.linalg.norm(found - centre) < 0.75  # mm, a quarter of an output voxel


def test_output_is_ras_at_target_spacing(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, _ = marked_volume
    out = Preprocessor(SETTINGS)(volume)
    spacing = np.linalg.norm(out.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 3.0, atol=1e-6)
    # Orientation picks the nearest RAS axes: each output axis points mostly along +x, +y, +z.
    directions = out.affine[:3, :3] / spacing
    assert np.all(np.diag(directions) > 0.95)


def test_axis_aligned_lps_volume_flips_to_ras() -> None:
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # DICOM-like: i towards left... negated to RAS
    array = np.random.default_rng(0).uniform(0, 0.1, (20, 20, 20)).astype(np.float32)
    array[3, 3, 3] = 10.0
    settings = PreprocessSettings(target_spacing=(2.0, 2.0, 2.0), target_shape=(20, 20, 20),
                                  intensity_percentiles=(0.0, 100.0))
    out = Preprocessor(settings)(Volume(array, affine))
    np.testing.assert_allclose(out.affine[:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-6)
    # Voxel (3,3,3) sat at RAS (-6,-6,6); in the flipped grid it is index (16,16,3).
    peak = np.unravel_index(np.argmax(out.image[0]), out.image.shape[1:])
    np.testing.assert_allclose(out.affine[:3, :3] @ np.array(peak) + out.affine[:3, 3], [-6, -6, 6], atol=1e-6)


def test_mask_is_nearest_and_follows_the_image(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, centre = marked_volume
    mask = Volume((_blob(volume.affine, volume.shape, centre, 6.0) > 0.5).astype(np.float32), volume.affine)
    out = Preprocessor(SETTINGS)(volume, mask)
    assert out.mask is not None and out.mask.dtype == np.uint8 and out.mask.shape == (1, 32, 32, 32)
    assert set(np.unique(out.mask)) == {0, 1}
    assert np.linalg.norm(_centroid_ras(out.mask[0], out.affine) - centre) < 1.5
    labelled = Volume(mask.array * 3.0, volume.affine)  # class labels are kept, never blended
    assert set(np.unique(Preprocessor(SETTINGS)(volume, labelled).mask)) == {0, 3}


def test_mask_on_another_grid_is_refused(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, _ = marked_volume
    shifted = volume.affine.copy()
    shifted[0, 3] += 5.0
    with pytest.raises(InputError, match="affine"):
        Preprocessor(SETTINGS)(volume, Volume(np.zeros(volume.shape, np.float32), shifted))
    with pytest.raises(InputError, match="shape"):
        Preprocessor(SETTINGS)(volume, Volume(np.zeros((2, 2, 2), np.float32), volume.affine))


def test_intensity_scaling_is_robust_and_scale_free(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, _ = marked_volume
    rng = np.random.default_rng(0)
    noisy = volume.array + rng.normal(0, 5, volume.shape).astype(np.float32)
    hot = noisy.copy()
    hot[0, 0, :5] = 1e6  # a few hot voxels must not squash the rest
    pre = Preprocessor(SETTINGS)
    clean = pre(Volume(noisy, volume.affine)).image
    a = pre(Volume(hot, volume.affine)).image
    b = pre(Volume(hot * 3.0 + 1000.0, volume.affine)).image
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - b).max() < 1e-3  # vendor scale and offset do not matter
    assert np.quantile(np.abs(a - clean), 0.99) < 1e-3  # hot voxels change only their neighbourhood


def test_constant_volume_gives_zeros() -> None:
    out = Preprocessor(SETTINGS)(Volume(np.full((8, 8, 8), 7.0, np.float32), np.eye(4)))
    assert out.image.shape == (1, 32, 32, 32) and not out.image.any()


@pytest.mark.parametrize("shape", [(16, 24, 8), (33, 31, 1)])
def test_any_target_shape(shape: tuple[int, int, int], marked_volume: tuple[Volume, np.ndarray]) -> None:
    out = Preprocessor(PreprocessSettings(target_spacing=(4.0, 4.0, 4.0), target_shape=shape))(marked_volume[0])
    assert out.image.shape == (1, *shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"orientation": "RAA"},
        {"orientation": "RA"},
        {"target_spacing": (1.0, 0.0, 1.0)},
        {"target_shape": (64, 64)},
        {"intensity_percentiles": (99.0, 1.0)},
        {"intensity_percentiles": (0.0, 101.0)},
        {"cache_dtype": "int8"},
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="data.preprocess"):
        PreprocessSettings(**kwargs)


def test_settings_from_preset() -> None:
    settings = PreprocessSettings.from_config(load_config("tiny").data.preprocess)
    assert settings.target_shape == (64, 64, 64) and settings.target_spacing == (3.0, 3.0, 3.0)
    assert settings.digest() != PreprocessSettings().digest()


def test_cache_key_tracks_content_settings_and_mask(marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, _ = marked_volume
    base = cache_key(volume, SETTINGS)
    assert cache_key(Volume(volume.array.copy(), volume.affine.copy()), SETTINGS) == base
    changed = volume.array.copy()
    changed[0, 0, 0] += 1.0
    assert cache_key(Volume(changed, volume.affine), SETTINGS) != base
    assert cache_key(volume, PreprocessSettings(target_spacing=(3.0, 3.0, 3.0), target_shape=(32, 32, 31))) != base
    assert cache_key(volume, SETTINGS, Volume(np.zeros(volume.shape, np.float32), volume.affine)) != base


def test_cache_round_trip_is_atomic_and_compact(tmp_path, marked_volume: tuple[Volume, np.ndarray]) -> None:
    volume, centre = marked_volume
    mask = Volume((volume.array > 500).astype(np.float32), volume.affine)
    out = Preprocessor(SETTINGS)(volume, mask)
    cache = VolumeCache(tmp_path / "cache")
    key = cache_key(volume, SETTINGS, mask)
    assert not cache.has(key)
    path = cache.save(key, out)
    assert cache.has(key) and path == cache.path(key)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    back = cache.load(key)
    assert back.image.dtype == np.float16 and back.mask is not None and back.mask.dtype == np.uint8
    np.testing.assert_allclose(back.image.astype(np.float32), out.image, atol=1e-3)
    np.testing.assert_array_equal(back.mask, out.mask)
    np.testing.assert_array_equal(back.affine, out.affine)
    with pytest.raises(InputError, match="index"):
        cache.load("0" * 64)
