"""Segmentation decoders (UNETR-style and light): shapes from real encoder tokens, learning, DP checks, errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from opacus.validators import ModuleValidator

from conftest import blob_volumes
from fedmri.errors import ConfigError
from fedmri.heads import LightDecoder, UNETRDecoder, build_segmentation_head, default_skip_layers, skip_layers
from fedmri.models import build_encoder


def _tokens(encoder, cfg, images):
    with torch.no_grad():
        return encoder(images, return_layers=skip_layers(cfg))


@pytest.mark.parametrize("norm", ["instance", "layer"])
@pytest.mark.parametrize("image_skip", [True, False])
def test_output_is_a_voxel_map_of_the_input_size(encoder, cfg, norm: str, image_skip: bool) -> None:
    images = torch.rand(2, 1, 32, 32, 32)
    out = _tokens(encoder, cfg, images)
    decoder = UNETRDecoder(48, 3, feature_size=8, norm=norm, image_skip=image_skip)
    logits = decoder(out["layers"], out["patch"], out["grid"], images if image_skip else None)
    assert logits.shape == (2, 3, 32, 32, 32)


def test_non_cubic_inputs_and_float16_cached_layers(encoder, cfg) -> None:
    images = torch.rand(1, 1, 32, 48, 16)
    out = _tokens(encoder, cfg, images)
    decoder = build_segmentation_head(cfg, 2)
    logits = decoder([t.half() for t in out["layers"]], out["patch"].half(), out["grid"], images)
    assert logits.shape == (1, 2, 32, 48, 16) and logits.dtype == torch.float32


@pytest.mark.parametrize("kind", ["unetr", "light"])
def test_decoder_learns_to_segment_blobs_from_frozen_tokens(encoder, cfg, kind: str) -> None:
    torch.manual_seed(0)
    images, _ = blob_volumes(2, seed=3)
    labels = (images > 0.4).long()  # B, 1, X, Y, Z
    out = _tokens(encoder, cfg, images)
    decoder = build_segmentation_head(OmegaConf.merge(cfg, {"heads": {"seg_decoder": kind}}), 2)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = decoder.loss(decoder(out["layers"], out["patch"], out["grid"], images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # about 0.5 here


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_decoder_passes_the_opacus_validator(norm: str) -> None:
    decoder = UNETRDecoder(48, 2, feature_size=8, norm=norm)
    assert ModuleValidator.validate(decoder, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in decoder.modules())


def test_default_skip_layers_follow_unetr() -> None:
    assert default_skip_layers(12) == (3, 6, 9)
    assert default_skip_layers(4) == (1, 2, 3)


def test_forward_argument_errors(encoder, cfg) -> None:
    images = torch.rand(1, 1, 32, 32, 32)
    out = _tokens(encoder, cfg, images)
    decoder = UNETRDecoder(48, 2, feature_size=8)
    with pytest.raises(ValueError, match="image_skip"):
        decoder(out["layers"], out["patch"], out["grid"])
    with pytest.raises(ValueError, match="3 intermediate"):
        decoder(out["layers"][:2], out["patch"], out["grid"], images)
    with pytest.raises(ValueError, match="patch grid"):
        decoder(out["layers"], out["patch"], (3, 2, 2), images)


@pytest.mark.parametrize("override, match", [
    ({"heads": {"seg_norm": "batch"}}, "seg_norm"),
    ({"heads": {"seg_layers": [0, 1]}}, "seg_layers"),
    ({"heads": {"seg_layers": [0, 1, 4]}}, "seg_layers"),
    ({"model": {"patch_size": 8}}, "patch_size"),
    ({"heads": {"seg_decoder": "fpn"}}, "seg_decoder"),
    ({"heads": {"seg_decoder": "light", "seg_stride": 3}}, "seg_stride"),
    ({"heads": {"seg_decoder": "light", "seg_norm": "batch"}}, "seg_norm"),
])
def test_bad_config_is_a_config_error(cfg, override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_segmentation_head(OmegaConf.merge(cfg, override), 2)


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        UNETRDecoder(48, 0)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_light_decoder_gives_a_voxel_map_at_any_stride(encoder, cfg, stride: int) -> None:
    images = torch.rand(2, 1, 32, 48, 16)
    out = _tokens(encoder, cfg, images)
    light = OmegaConf.merge(cfg, {"heads": {"seg_decoder": "light", "seg_stride": stride}})
    decoder = build_segmentation_head(light, 2)
    assert isinstance(decoder, LightDecoder) and decoder.image_skip
    logits = decoder([t.half() for t in out["layers"]], out["patch"].half(), out["grid"], images)
    assert logits.shape == (2, 2, 32, 48, 16) and logits.dtype == torch.float32
    assert ModuleValidator.validate(decoder, strict=False) == []  # DP-safe: no batch norm


def test_light_decoder_takes_any_patch_size(cfg) -> None:
    small_patches = OmegaConf.merge(cfg, {"model": {"patch_size": 8}, "heads": {"seg_decoder": "light"}})
    encoder = build_encoder(small_patches.model).eval()
    images = torch.rand(1, 1, 32, 32, 32)
    out = _tokens(encoder, small_patches, images)
    assert out["grid"] == (4, 4, 4)
    logits = build_segmentation_head(small_patches, 2)(out["layers"], out["patch"], out["grid"], images)
    assert logits.shape == (1, 2, 32, 32, 32)


def test_light_decoder_needs_the_image_and_its_layers(encoder, cfg) -> None:
    images = torch.rand(1, 1, 32, 32, 32)
    out = _tokens(encoder, cfg, images)
    decoder = LightDecoder(48, 2, width=8)
    with pytest.raises(ValueError, match="reads the image"):
        decoder(out["layers"], out["patch"], out["grid"])
    with pytest.raises(ValueError, match="3 intermediate"):
        decoder(out["layers"][:2], out["patch"], out["grid"], images)
