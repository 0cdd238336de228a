"""The ViT building blocks: behaviour and illegal arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmri.models.dino_head import WeightNormLinear
from fedmri.models.layers import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    MaskEmbed,
    PatchEmbed3D,
    PositionEmbedding3D,
    PrefixTokens,
)


def test_attention_matches_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4**0.5, dim=-1)  # B, H, N, N
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_patch_embed_is_a_strided_conv() -> None:
    pe = PatchEmbed3D(4, 1, 6)
    x = torch.rand(1, 1, 8, 4, 4)
    out = pe(x)
    assert out.shape == (1, 6, 2, 1, 1)
    # Patch (1, 0, 0) is voxels 4..7 along x: a dot product with the kernel.
    manual = (pe.proj.weight[:, 0] * x[0, 0, 4:8]).sum((1, 2, 3)) + pe.proj.bias
    torch.testing.assert_close(out[0, :, 1, 0, 0], manual)


def test_patch_projection_computes_the_strided_conv_and_its_gradients() -> None:
    """The matmul form gives Conv3d's output and parameter gradients, with 2 channels and a
    volume that is not a whole number of patches (both drop the remainder)."""
    torch.manual_seed(0)
    pe = PatchEmbed3D(4, 2, 6)
    x = torch.rand(3, 2, 9, 8, 13)
    out = pe(x)
    expected = F.conv3d(x, pe.proj.weight, pe.proj.bias, stride=4)
    assert out.shape == expected.shape == (3, 6, 2, 2, 3)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), [pe.proj.weight, pe.proj.bias])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [pe.proj.weight, pe.proj.bias])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("patch, widths", [(2, [16]), (8, [16, 32, 48]), (16, [16, 32, 48, 48])])
def test_conv_stem_halves_the_grid_per_layer_down_to_the_patch_grid(patch: int, widths: list[int]) -> None:
    pe = PatchEmbed3D(patch, 1, 48, stem="conv")
    convs = [m for m in pe.proj if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [*widths, 48] and all(c.stride == (2, 2, 2) for c in convs[:-1])
    out = pe(torch.rand(2, 1, 2 * patch, patch, 3 * patch))
    assert out.shape == (2, 48, 2, 1, 3)
    # GroupNorm's statistics are each sample's own: a batch gives what its samples give one by one.
    x = torch.rand(3, 1, 2 * patch, patch, 3 * patch)
    torch.testing.assert_close(pe(x), torch.cat([pe(x[i:i + 1]) for i in range(3)]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"stem": "mlp"}, "stem"), ({"patch_size": 12, "stem": "conv"}, "power of two")])
def test_patch_embed_rejects_a_bad_stem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PatchEmbed3D(**{"patch_size": 16, "in_chans": 1, "embed_dim": 8, **kwargs})


def test_block_with_zero_layerscale_gain_is_identity() -> None:
    block = Block(8, 2, layerscale_init=1e-5)
    with torch.no_grad():
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(block(x), x)
    assert isinstance(Block(8, 2, layerscale_init=0.0).ls1, torch.nn.Identity)


def test_drop_path_drops_whole_samples_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    out = dp(torch.ones(4000, 3))
    per_sample = out[:, 0]
    values = per_sample.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert torch.equal(out[:, 0], out[:, 2])  # one decision per sample
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.05)


def test_prefix_and_mask_tokens() -> None:
    prefix = PrefixTokens(4, num_register_tokens=2)
    out = prefix(torch.zeros(3, 5, 4))
    assert out.shape == (3, 8, 4)
    torch.testing.assert_close(out[1, 0], prefix.cls_token[0, 0])
    me = MaskEmbed(4)
    with torch.no_grad():
        me.mask_token.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m = torch.zeros(1, 1, 2, 1, 1)
    m[0, 0, 1] = 1.0
    out = me(m)
    torch.testing.assert_close(out[0, :, 1, 0, 0], me.mask_token)
    assert out[0, :, 0].abs().sum() == 0
    assert LayerScale(3, 0.5)(torch.ones(3)).tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: PatchEmbed3D(0, 1, 8), "patch_size"),
        (lambda: PositionEmbedding3D((2, 2), 8), "grid"),
        (lambda: Attention(10, 3), "num_heads"),
        (lambda: DropPath(1.0), "drop_prob"),
        (lambda: PrefixTokens(8, -1), "num_register_tokens"),
        (lambda: Block(10, 4), "num_heads"),
        (lambda: WeightNormLinear(0, 4), "in_features"),
    ],
)
def test_illegal_arguments(build: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()  # type: ignore[operator]
