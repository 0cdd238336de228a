"""3D multi-crop augmentation and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmri.config import load_config
from fedmri.ssl import MaskingGenerator3D, MultiCropAugmentation, RandResizedCrop3D, build_multicrop, collate_multicrop


def test_crop_counts_shapes_and_plain_tensors() -> None:
    aug = MultiCropAugmentation(32, 16, local_crops_number=3).set_random_state(0)
    out = aug(torch.rand(1, 40, 36, 44))
    assert [c.shape for c in out["global_crops"]] == [(1, 32, 32, 32)] * 2
    assert [c.shape for c in out["local_crops"]] == [(1, 16, 16, 16)] * 3
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in out["global_crops"])
    assert not torch.equal(out["global_crops"][0], out["global_crops"][1])  # two different views


def test_seeded_augmentation_is_reproducible() -> None:
    v = torch.rand(1, 24, 24, 24)
    a = MultiCropAugmentation(16, 8, 2).set_random_state(7)(v)
    b = MultiCropAugmentation(16, 8, 2).set_random_state(7)(v)
    c = MultiCropAugmentation(16, 8, 2).set_random_state(8)(v)
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"]))
    assert not torch.equal(a["local_crops"][1], c["local_crops"][1])


@pytest.mark.parametrize(("scale", "lo", "hi"), [((0.32, 1.0), 0.32, 1.0), ((0.05, 0.32), 0.05, 0.32)])
def test_random_resized_crop_volume_fraction(scale: tuple[float, float], lo: float, hi: float) -> None:
    crop = RandResizedCrop3D(8, scale)
    crop.set_random_state(0)
    shape = (40, 40, 40)
    fractions = []
    for _ in range(200):
        crop.randomize(shape)
        start, end = crop._box
        assert all(0 <= s < e <= n for s, e, n in zip(start, end, shape))
        fractions.append(np.prod(np.subtract(end, start)) / np.prod(shape))
    # Rounding each edge moves the volume by a few percent either way.
    assert min(fractions) > 0.85 * lo and max(fractions) < 1.15 * hi
    assert max(fractions) - min(fractions) > 0.5 * (hi - lo)


def test_crop_content_comes_from_the_box() -> None:
    # An intensity ramp along x: the crop's mean x-intensity must match its box.
    ramp = torch.linspace(0, 1, 40).view(1, 40, 1, 1).expand(1, 40, 40, 40).clone()
    crop = RandResizedCrop3D(10, (0.1, 0.2))
    crop.set_random_state(1)
    out = crop(ramp)
    (x0, _, _), (x1, _, _) = crop._box
    assert out.shape == (1, 10, 10, 10)
    assert float(out.mean()) == pytest.approx(float(ramp[0, x0:x1, 0, 0].mean()), abs=0.02)


def test_intensity_jitter_changes_intensities_and_flips_happen() -> None:
    v = torch.linspace(0, 1, 16 ** 3).view(1, 16, 16, 16)
    plain = MultiCropAugmentation(16, 8, 0, global_crops_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
                                  flip_prob=0.0, intensity_prob=0.0).set_random_state(0)
    assert torch.allclose(plain(v)["global_crops"][0], v, atol=1e-6)  # identity when all off
    flipped = MultiCropAugmentation(16, 8, 0, global_crops_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
                                    flip_prob=1.0, intensity_prob=0.0).set_random_state(0)
    torch.testing.assert_close(flipped(v)["global_crops"][0], v.flip(1, 2, 3))
    jitter = MultiCropAugmentation(16, 8, 0, global_crops_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
                                   flip_prob=0.0, intensity_prob=1.0).set_random_state(0)
    assert (jitter(v)["global_crops"][0] - v).abs().mean() > 0.01


def test_build_multicrop_uses_preset_sizes() -> None:
    cfg = load_config("tiny")
    out = build_multicrop(cfg).set_random_state(0)(torch.rand(1, 64, 64, 64))
    assert len(out["local_crops"]) == cfg.ssl.local_crops_number
    assert out["global_crops"][0].shape[-1] == cfg.ssl.global_crops_size
    assert out["local_crops"][0].shape[-1] == cfg.ssl.local_crops_size


def test_collate_is_crop_major_with_masks() -> None:
    samples = [{"global_crops": [torch.full((1, 8, 8, 8), 10.0 * b + g) for g in range(2)],
                "local_crops": [torch.full((1, 4, 4, 4), 100.0 + 10 * b + j) for j in range(3)]} for b in range(4)]
    out = collate_multicrop(samples, MaskingGenerator3D((2, 2, 2)), 0.5, (0.1, 0.5), np.random.default_rng(0))
    assert out["global_crops"].shape == (8, 1, 8, 8, 8)
    assert out["global_crops"][:, 0, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert out["local_crops"][:, 0, 0, 0, 0].tolist()[:5] == [100, 110, 120, 130, 101]
    assert out["masks"].shape == (8, 8) and int((out["masks"].sum(1) > 0).sum()) == 4
    none = collate_multicrop([{"global_crops": s["global_crops"], "local_crops": []} for s in samples])
    assert none["local_crops"] is None and none["masks"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(local_crops_number=-1), "local_crops_number"), (dict(global_crops_size=0), "crop size"),
     (dict(global_crops_scale=(0.0, 1.0)), "scale"), (dict(local_crops_scale=(0.5, 0.2)), "scale"),
     (dict(aspect_ratio=(2.0, 1.0)), "aspect"), (dict(flip_prob=1.5), "flip_prob")],
)
def test_illegal_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiCropAugmentation(**({"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 1} | kwargs))


def test_illegal_volume() -> None:
    with pytest.raises(ValueError, match="one volume"):
        MultiCropAugmentation(16, 8, 1)(torch.rand(2, 1, 16, 16, 16))
