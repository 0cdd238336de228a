"""Feature cache: hits, misses, invalidation by encoder weights, layers, and heads on cached features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import blob_volumes
from fedmri.errors import InputError
from fedmri.heads import FeatureCache, MLPHead, pool_features, preprocess_key

KEY = "preprocess-v1"


class Loader:
    """Returns stored volumes by id and counts what it was asked for."""

    def __init__(self, volumes: dict[str, torch.Tensor]) -> None:
        self.volumes = volumes
        self.calls: list[str] = []

    def __call__(self, item_id: str) -> torch.Tensor:
        self.calls.append(item_id)
        return self.volumes[item_id]


@pytest.fixture
def loader() -> Loader:
    images, _ = blob_volumes(5, seed=0)
    return Loader({f"series-{i}": images[i] for i in range(5)})


def test_miss_then_hit_returns_the_same_features(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)
    first = FeatureCache(tmp_path, encoder, preprocess_key=KEY, batch_size=2).get(ids, loader)
    assert (first.hits, first.misses) == (0, 5) and sorted(loader.calls) == sorted(ids)
    loader.calls.clear()
    second = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    assert (second.hits, second.misses) == (5, 0) and loader.calls == []  # no volume was read
    assert torch.equal(first.cls, second.cls) and torch.equal(first.mean, second.mean)
    assert torch.equal(first.max, second.max)
    assert second.ids == ids and second.cls.shape == (5, 48) and second.cls.dtype == torch.float32


def test_cached_features_equal_the_live_encoder(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)[:3]
    feats = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    with torch.no_grad():
        live = encoder(torch.stack([loader.volumes[i] for i in ids]))
    torch.testing.assert_close(feats.cls, live["cls"])
    torch.testing.assert_close(feats.mean, live["patch"].mean(1))
    torch.testing.assert_close(feats.max, live["patch"].amax(1))


def test_changing_the_encoder_weights_invalidates_the_cache(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)
    before = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    with torch.no_grad():
        encoder.blocks[0].attn.qkv.weight[0, 0] += 0.5  # one weight changes
    after = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    assert (after.hits, after.misses) == (0, 5)
    assert not torch.equal(before.cls, after.cls)


def test_a_different_preprocessing_key_is_a_miss(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)[:2]
    FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    other = FeatureCache(tmp_path, encoder, preprocess_key="preprocess-v2").get(ids, loader)
    assert other.misses == 2


def test_only_new_ids_are_computed(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)
    FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids[:3], loader)
    loader.calls.clear()
    feats = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    assert (feats.hits, feats.misses) == (3, 2) and sorted(loader.calls) == sorted(ids[3:])


def test_layers_and_patch_tokens_are_cached_in_float16(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)[:2]
    cache = FeatureCache(tmp_path, encoder, preprocess_key=KEY, layers=(1, 2, 3), patch_tokens=True)
    cache.get(ids, loader)
    feats = cache.get(ids, loader)
    assert feats.hits == 2 and feats.grid == (2, 2, 2)
    assert feats.patch.shape == (2, 8, 48) and feats.patch.dtype == torch.float16
    assert len(feats.layers) == 3 and all(t.shape == (2, 8, 48) and t.dtype == torch.float16 for t in feats.layers)
    with torch.no_grad():
        live = encoder(torch.stack([loader.volumes[i] for i in ids]), return_layers=(1, 2, 3))
    torch.testing.assert_close(feats.layers[2].float(), live["layers"][2], atol=1e-2, rtol=1e-2)
    # Without layers it is another entry: the pooled-only cache is not reused for layers.
    assert FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader).misses == 2


def test_a_damaged_entry_is_recomputed(tmp_path: Path, encoder, loader: Loader) -> None:
    ids = list(loader.volumes)[:2]
    FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    entry = next(tmp_path.rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:50])  # cut short
    feats = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(ids, loader)
    assert (feats.hits, feats.misses) == (1, 1)


def test_encoder_mode_is_restored(tmp_path: Path, encoder, loader: Loader) -> None:
    encoder.train()
    FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(list(loader.volumes)[:1], loader)
    assert encoder.training


def test_bad_requests_are_input_errors(tmp_path: Path, encoder, loader: Loader) -> None:
    cache = FeatureCache(tmp_path, encoder, preprocess_key=KEY, patch_tokens=True)
    with pytest.raises(InputError, match="no volume ids"):
        cache.get([], loader)
    loader.volumes["odd"] = torch.rand(1, 48, 32, 32)
    with pytest.raises(InputError, match="different patch grids"):
        cache.get(["series-0", "odd"], loader)
    with pytest.raises(InputError, match="batch size"):
        FeatureCache(tmp_path, encoder, preprocess_key=KEY, batch_size=0)


def test_preprocess_key_is_stable_and_sensitive(cfg) -> None:
    key = preprocess_key(cfg.data.preprocess)
    assert key == preprocess_key(cfg.data.preprocess)
    assert key != preprocess_key({**dict(cfg.data.preprocess), "target_shape": [96, 96, 96]})


def test_a_head_trains_on_cached_features(tmp_path: Path, encoder) -> None:
    images, radii = blob_volumes(24, seed=5)
    volumes = {f"s{i}": images[i] for i in range(24)}
    labels = (radii > radii.median()).long()  # large vs small ball
    feats = FeatureCache(tmp_path, encoder, preprocess_key=KEY).get(list(volumes), volumes.__getitem__)
    x = pool_features(feats.as_encoder_output(), "cls+mean")  # 24, 96
    head = MLPHead(x.shape[1], 2, "multiclass", hidden_dim=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = head.loss(head(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_build_from_config_reads_the_heads_section(tmp_path: Path, cfg, encoder) -> None:
    from omegaconf import OmegaConf

    from fedmri.heads import build_feature_cache

    cfg = OmegaConf.merge(cfg, {"heads": {"cache_dir": str(tmp_path / "c"), "extract_batch_size": 3}})
    cache = build_feature_cache(cfg, encoder, layers=(1, 2, 3))
    assert cache.root == tmp_path / "c" and cache.batch_size == 3 and cache.layers == [1, 2, 3]
    assert cache.preprocess_key == preprocess_key(cfg.data.preprocess)
