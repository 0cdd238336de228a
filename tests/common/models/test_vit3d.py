"""ViT3D: shapes, position-embedding resizing, masks, layers, registers, arguments, DP safety."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedmri.config import load_config
from fedmri.config.schema import ModelConfig
from fedmri.errors import ConfigError
from fedmri.models import DINOHead, ViT3D, build_encoder

TINY = dict(img_size=(16, 16, 16), patch_size=8, embed_dim=32, depth=2, num_heads=2)  # transformers-style tiny


def tiny(**kwargs: object) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(**{**TINY, **kwargs}).eval()


@pytest.mark.parametrize(
    ("shape", "grid"),
    [((16, 16, 16), (2, 2, 2)), ((32, 32, 32), (4, 4, 4)), ((8, 24, 16), (1, 3, 2))],
)
@pytest.mark.parametrize("registers", [0, 2])
def test_output_shapes(shape: tuple[int, int, int], grid: tuple[int, int, int], registers: int) -> None:
    model = tiny(num_register_tokens=registers)
    out = model(torch.rand(3, 1, *shape))
    n = grid[0] * grid[1] * grid[2]
    assert out["cls"].shape == (3, 32)
    assert out["patch"].shape == (3, n, 32)
    assert out["layers"] == []
    assert out["grid"] == grid == model.grid_size(shape)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_run_at_their_input_size(preset: str) -> None:
    cfg = load_config(preset)
    model = build_encoder(cfg).eval()
    size = cfg.data.preprocess.target_shape
    with torch.no_grad():
        out = model(torch.rand(1, 1, *size))
    n = (size[0] // cfg.model.patch_size) ** 3
    assert out["patch"].shape == (1, n, cfg.model.embed_dim)


def test_base_is_vit_b_sized() -> None:
    # ViT-B/16 with a 16^3 Conv3d patch embedding: ~86M parameters.
    model = build_encoder("base")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 86e6) / 86e6 < 0.03, n


def test_position_embedding_same_size_is_the_table_itself() -> None:
    pe = tiny().pos_embed
    assert pe.resized((2, 2, 2)) is pe.pos_embed


def test_position_embedding_resizes_trilinearly() -> None:
    pe = tiny().pos_embed
    with torch.no_grad():
        pe.pos_embed.copy_(torch.arange(8.0).view(1, 1, 2, 2, 2).expand(1, 32, 2, 2, 2))
    big = pe.resized((4, 6, 2))
    assert big.shape == (1, 32, 4, 6, 2)
    # Doubling x with align_corners=False puts output 0 on input 0 and output 1
    # a quarter of the way to input 1 (x-stride of the table is 4).
    assert torch.allclose(big[0, 0, 0, 0, 0], torch.tensor(0.0))
    assert torch.allclose(big[0, 0, 1, 0, 0], torch.tensor(1.0))
    # Along z the size is unchanged: values come straight from the table.
    assert torch.allclose(big[0, 0, 0, 0, :], torch.tensor([0.0, 1.0]))


def test_different_crop_sizes_alternate_through_one_model() -> None:
    model = tiny()
    x = torch.rand(2, 1, 16, 16, 16)
    first = model(x)["cls"]
    model(torch.rand(2, 1, 32, 24, 8))  # a local-crop-sized call in between
    assert torch.equal(model(x)["cls"], first)


def test_masks_replace_exactly_the_masked_tokens() -> None:
    model = tiny(depth=1)
    with torch.no_grad():
        model.mask_embed.mask_token.normal_()
    x = torch.rand(2, 1, 16, 16, 16)
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, [1, 5]] = True
    # Read the tokens entering the blocks.
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(x)
    model(x, masks=masks)
    plain, masked = seen[0][:, 1:], seen[1][:, 1:]  # drop CLS
    pos = model.pos_embed.pos_embed.flatten(2).transpose(1, 2)[0]  # N, D
    changed = (plain - masked).abs().amax(-1) > 0
    assert torch.equal(changed, masks)
    assert torch.allclose(masked[0, 1], model.mask_embed.mask_token + pos[1])
    assert torch.allclose(masked[0, 5], model.mask_embed.mask_token + pos[5])
    # All-False masks change nothing.
    assert torch.equal(model(x, masks=torch.zeros_like(masks))["patch"], model(x)["patch"])


def test_return_layers_are_normed_block_outputs_in_requested_order() -> None:
    model = tiny(depth=3)
    x = torch.rand(2, 1, 16, 16, 16)
    outs: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: outs.append(out))
    result = model(x, return_layers=[2, 0, -2])
    assert [t.shape for t in result["layers"]] == [(2, 8, 32)] * 3
    assert torch.allclose(result["layers"][0], result["patch"])  # the last block, normed
    assert torch.allclose(result["layers"][1], model.norm(outs[0][:, 1:]))
    assert torch.allclose(result["layers"][2], model.norm(outs[1][:, 1:]))
    with pytest.raises(ValueError, match="return_layers"):
        model(x, return_layers=[3])


def test_register_tokens_are_neither_cls_nor_patch() -> None:
    model = tiny(num_register_tokens=3)
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    out = model(torch.rand(2, 1, 16, 16, 16))
    assert seen[0].shape == (2, 1 + 3 + 8, 32)
    assert out["patch"].shape == (2, 8, 32)
    assert torch.allclose(seen[0][0, 1:4], model.prefix.register_tokens[0])
    # The registers are used: changing them changes the CLS output.
    with torch.no_grad():
        model.prefix.register_tokens.normal_()
    assert not torch.allclose(model(torch.rand(2, 1, 16, 16, 16))["cls"], out["cls"])


def test_drop_path_only_in_training() -> None:
    model = tiny(drop_path_rate=0.5)
    x = torch.rand(4, 1, 16, 16, 16)
    assert torch.equal(model(x)["cls"], model(x)["cls"])
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(model(x)["cls"], model(x)["cls"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(embed_dim=33), "num_heads"),
        (dict(img_size=(16, 16, 12)), "patch_size"),
        (dict(img_size=(16, 16)), "3 entries"),
        (dict(depth=0), "depth"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(drop_path_rate=-0.1), "drop_path_rate"),
        (dict(num_register_tokens=-1), "num_register_tokens"),
        (dict(patch_size=0), "patch_size"),
        (dict(in_chans=0), "in_chans"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(layerscale_init=-1.0), "layerscale_init"),
    ],
)
def test_illegal_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViT3D(**{**TINY, **kwargs})


def test_illegal_inputs() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.rand(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        model(torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="masks"):
        model(torch.rand(1, 1, 16, 16, 16), masks=torch.zeros(1, 7, dtype=torch.bool))


def test_build_encoder_accepts_preset_config_section_and_dataclass() -> None:
    cfg = load_config("tiny")
    by_name, by_cfg, by_section = build_encoder("tiny"), build_encoder(cfg), build_encoder(cfg.model)
    by_dataclass = build_encoder(ModelConfig(img_size=[64, 64, 64], embed_dim=96, depth=4, num_heads=3))
    for m in (by_name, by_cfg, by_section, by_dataclass):
        assert (m.embed_dim, m.depth, m.patch_size, m.img_size) == (96, 4, 16, (64, 64, 64))


def test_build_encoder_errors_name_the_bad_value() -> None:
    with pytest.raises(ConfigError, match="embed_dim 100"):
        build_encoder(load_config("tiny", overrides=["model.embed_dim=100"]))
    with pytest.raises(ConfigError, match="unknown preset"):
        build_encoder("huge")


def test_no_batchnorm_opacus_validator_is_empty() -> None:
    cfg = load_config("tiny")
    assert ModuleValidator.validate(build_encoder(cfg), strict=False) == []
    assert ModuleValidator.validate(build_encoder(load_config("tiny", overrides=["model.stem=conv"])),
                                    strict=False) == []
    assert ModuleValidator.validate(DINOHead(96, 64, 32, 16), strict=False) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("force_functorch", [False, True])
def test_opacus_per_sample_gradients_match_single_sample_backward(force_functorch: bool, stem: str) -> None:
    # DP-safe by construction: Opacus' per-sample gradients (its Linear/Conv/
    # LayerNorm samplers and functorch for the token modules) equal the gradients
    # of each sample run alone, with masks, registers and a resized grid.
    torch.manual_seed(0)
    # The stems' gradients are sums over every voxel with much cancellation: float32 rounding differs
    # between a batch of 3 and one sample by ~1e-2 relative (conv stem) and ~3e-3 (the patch
    # projection's weight, by functorch against its matmul); float64 agrees to 1e-9.
    dtype = torch.float64
    model = ViT3D(**{**TINY, "num_register_tokens": 2, "layerscale_init": 0.1, "stem": stem}).to(dtype).train()

    def loss_fn(m: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = m(x, masks=masks)
        return (out["cls"].sum(-1) + out["patch"].pow(2).sum((1, 2))).sum()

    x = torch.rand(3, 1, 24, 16, 16, dtype=dtype)
    masks = torch.rand(3, 12) < 0.4
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=force_functorch)
    loss_fn(gsm, x, masks).backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm._close()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        loss_fn(model, x[i:i + 1], masks[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5, msg=name)
