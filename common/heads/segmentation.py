"""UNETR-style segmentation decoder on the frozen encoder's tokens.

Hatamizadeh et al. 2022, "UNETR: Transformers for 3D Medical Image
Segmentation", built from MONAI's blocks as in ``monai.networks.nets.UNETR``,
but fed by tokens that :class:`fedmri.models.ViT3D` (or the feature cache)
returns instead of a ViT of its own: three intermediate layers and the final
patch tokens, plus, optionally, the image itself for the full-resolution skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.blocks import (Convolution, UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrPrUpBlock,
                                   UnetrUpBlock)
from torch import Tensor, nn

from fedmri.errors import ConfigError

NORMS = ("instance", "layer")
_PATCH = 16  # UNETR upsamples four times by 2: tokens must cover 16^3 voxels


def default_skip_layers(depth: int) -> tuple[int, int, int]:
    """UNETR's skip layers (blocks 3, 6, 9 of 12, 0-based) scaled to ``depth`` blocks."""
    if depth < 3:
        raise ConfigError(f"a UNETR decoder needs an encoder of depth >= 3, got {depth}")
    return depth // 4, depth // 2, (3 * depth) // 4


def _tokens_to_volume(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    b, n, d = tokens.shape
    if n != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"{n} tokens do not fill the patch grid {tuple(grid)}")
    # Tokens are x-major (ViT3D's flatten order), channels go first for conv.
    return tokens.reshape(b, *grid, d).permute(0, 4, 1, 2, 3).contiguous()  # B, D, gx, gy, gz


class UNETRDecoder(nn.Module):
    """The UNETR decoder over ViT tokens with 16^3-voxel patches.

    Args:
        embed_dim: Token width D of the encoder.
        out_channels: Segmentation classes (background included).
        feature_size: UNETR's base width; stages use 1, 2, 4, 8 times it. Default 16.
        norm: ``"instance"`` (UNETR's default) or ``"layer"`` (GroupNorm with one
            group: LayerNorm over channels and space). Batch norm is not offered:
            its running statistics break per-sample DP. Default ``"instance"``.
        in_channels: Image channels for the full-resolution skip. Default 1.
        image_skip: Use the image as UNETR's first skip connection (sharper
            boundaries); without it the last stage upsamples tokens only.
        res_block: Residual conv blocks, as UNETR's default. Default True.

    Raises:
        ConfigError: For an unknown norm or a non-positive size.
    """

    # Dice and cross-entropy are both averaged per sample first (batch=False).
    per_sample_decomposable = True

    def __init__(self, embed_dim: int, out_channels: int, *, feature_size: int = 16, norm: str = "instance",
                 in_channels: int = 1, image_skip: bool = True, res_block: bool = True) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"heads.seg_norm {norm!r} is not one of {', '.join(NORMS)} (batch norm is not DP-safe)")
        if min(embed_dim, out_channels, feature_size, in_channels) < 1:
            raise ConfigError(f"decoder sizes must be >= 1: embed_dim={embed_dim}, out_channels={out_channels}, "
                              f"feature_size={feature_size}, in_channels={in_channels}")
        norm_name: tuple | str = ("group", {"num_groups": 1}) if norm == "layer" else "instance"
        fs, self.image_skip, self.out_channels = feature_size, image_skip, out_channels
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name)

        def pr_up(out: int, n: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(in_channels=embed_dim, out_channels=out, num_layer=n, stride=1,
                                  upsample_kernel_size=2, conv_block=True, res_block=res_block, **common)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(in_channels=cin, out_channels=cout, upsample_kernel_size=2,
                                res_block=res_block, **common)

        self.encoder2, self.encoder3, self.encoder4 = pr_up(fs * 2, 2), pr_up(fs * 4, 1), pr_up(fs * 8, 0)
        self.decoder5, self.decoder4, self.decoder3 = up(embed_dim, fs * 8), up(fs * 8, fs * 4), up(fs * 4, fs * 2)
        if image_skip:
            self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=fs, stride=1,
                                            res_block=res_block, **common)
            self.decoder2: nn.Module = up(fs * 2, fs)
        else:
            self.decoder2 = UnetrPrUpBlock(in_channels=fs * 2, out_channels=fs, num_layer=0, stride=1,
                                           upsample_kernel_size=2, **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=out_channels)
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(self, layers: Sequence[Tensor], patch: Tensor, grid: Sequence[int],
                image: Tensor | None = None) -> Tensor:
        """Voxel logits (B, out_channels, 16 gx, 16 gy, 16 gz).

        Args:
            layers: Three intermediate token maps (B, N, D), shallow to deep
                (e.g. :func:`default_skip_layers`), as ``return_layers`` gives them.
            patch: Final patch tokens (B, N, D).
            grid: Patch grid (gx, gy, gz).
            image: The input volumes (B, C, X, Y, Z); required with ``image_skip``.
        """
        if len(layers) != 3:
            raise ValueError(f"the decoder takes 3 intermediate layers, got {len(layers)}")
        if self.image_skip and image is None:
            raise ValueError("this decoder was built with image_skip=True: pass the input image")
        dtype = self.out.conv.conv.weight.dtype  # cached layers are float16
        enc2, enc3, enc4 = (enc(_tokens_to_volume(t.to(dtype), grid))
                            for enc, t in zip((self.encoder2, self.encoder3, self.encoder4), layers))
        x = self.decoder5(_tokens_to_volume(patch.to(dtype), grid), enc4)  # B, 8fs, X/8, ...
        x = self.decoder3(self.decoder4(x, enc3), enc2)  # B, 2fs, X/2, ...
        if self.image_skip:
            x = self.decoder2(x, self.encoder1(image.to(dtype)))  # B, fs, X, Y, Z
        else:
            x = self.decoder2(x)
        return self.out(x)  # B, out_channels, X, Y, Z

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Dice + cross-entropy against integer labels (B, 1, X, Y, Z)."""
        return self._loss(logits, target)


class LightDecoder(nn.Module):
    """A light decoder: every cached token map, fused with the image at a reduced resolution.

    UNETR's decoder (:class:`UNETRDecoder`) rebuilds the volume in four x2
    stages from the token grid, most of its cost at the two finest ones: with
    the image skip a step costs about 5x a from-scratch U-Net's FLOPs. This one
    does the segmentation's work once, at ``stride`` (the image's voxels / 2 by
    default), and lets the frozen tokens supply the context:

    1. the three intermediate token maps and the final patch tokens are joined
       (4 D channels on the patch grid), projected to ``width`` channels by a
       1x1x1 convolution and resized trilinearly to the working grid;
    2. the image goes through one strided 3x3x3 convolution to ``width`` channels;
    3. two residual 3x3x3 blocks (nnU-Net's ``UnetResBlock``) on both, a 1x1x1
       convolution to the classes, and the logits resized trilinearly to the image.

    Args:
        embed_dim: Token width D of the encoder.
        out_channels: Segmentation classes (background included).
        width: Channels at the working resolution. Default 16.
        stride: Working grid = image grid / ``stride`` (1, 2 or 4). Default 2.
        norm: ``"instance"`` or ``"layer"`` (never batch norm: DP). Default ``"instance"``.
        in_channels: Image channels. Default 1.
        token_maps: Token maps it reads (the three layers and the patch tokens). Default 4.

    Raises:
        ConfigError: For an unknown norm, a stride other than 1, 2 or 4, or a non-positive size.
    """

    per_sample_decomposable = True
    image_skip = True  # it always reads the image

    def __init__(self, embed_dim: int, out_channels: int, *, width: int = 16, stride: int = 2,
                 norm: str = "instance", in_channels: int = 1, token_maps: int = 4) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"heads.seg_norm {norm!r} is not one of {', '.join(NORMS)} (batch norm is not DP-safe)")
        if stride not in (1, 2, 4):
            raise ConfigError(f"heads.seg_stride must be 1, 2 or 4, got {stride}")
        if min(embed_dim, out_channels, width, in_channels, token_maps) < 1:
            raise ConfigError(f"decoder sizes must be >= 1: embed_dim={embed_dim}, out_channels={out_channels}, "
                              f"width={width}, in_channels={in_channels}")
        norm_name: tuple | str = ("group", {"num_groups": 1}) if norm == "layer" else "instance"
        self.stride, self.token_maps, self.out_channels = stride, token_maps, out_channels
        self.tokens = nn.Conv3d(token_maps * embed_dim, width, kernel_size=1)
        self.image = Convolution(3, in_channels, width, strides=stride, kernel_size=3, norm=norm_name,
                                 act=("leakyrelu", {"negative_slope": 0.01}))
        self.fuse = nn.Sequential(UnetResBlock(3, 2 * width, width, kernel_size=3, stride=1, norm_name=norm_name),
                                  UnetResBlock(3, width, width, kernel_size=3, stride=1, norm_name=norm_name))
        self.out = nn.Conv3d(width, out_channels, kernel_size=1)
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(self, layers: Sequence[Tensor], patch: Tensor, grid: Sequence[int],
                image: Tensor | None = None) -> Tensor:
        """Voxel logits (B, out_channels, X, Y, Z) on the image's grid.

        Args:
            layers: Intermediate token maps (B, N, D), ``token_maps - 1`` of them.
            patch: Final patch tokens (B, N, D).
            grid: Patch grid (gx, gy, gz).
            image: The input volumes (B, C, X, Y, Z); required.
        """
        if image is None:
            raise ValueError("the light decoder reads the image: pass it")
        if len(layers) + 1 != self.token_maps:
            raise ValueError(f"this decoder reads {self.token_maps - 1} intermediate layers, got {len(layers)}")
        dtype = self.out.weight.dtype  # cached layers are float16
        tokens = torch.cat([_tokens_to_volume(t.to(dtype), grid) for t in (*layers, patch)], dim=1)
        x = self.image(image.to(dtype))  # B, width, X/stride, ...
        t = F.interpolate(self.tokens(tokens), size=x.shape[2:], mode="trilinear", align_corners=False)
        logits = self.out(self.fuse(torch.cat([x, t], dim=1)))
        if self.stride == 1:
            return logits
        return F.interpolate(logits, size=image.shape[2:], mode="trilinear", align_corners=False)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Dice + cross-entropy against integer labels (B, 1, X, Y, Z)."""
        return self._loss(logits, target)


SEG_DECODERS = ("unetr", "light")


def build_segmentation_head(cfg: Any, out_channels: int, *,
                            image_skip: bool | None = None) -> UNETRDecoder | LightDecoder:
    """The decoder ``cfg.heads.seg_decoder`` for the encoder of ``cfg.model``, with ``cfg.heads`` settings.

    Args:
        cfg: The run config (``model`` and ``heads`` sections).
        out_channels: Segmentation classes (background included).
        image_skip: UNETR's full-resolution image skip; default ``heads.seg_image_skip``.

    Raises:
        ConfigError: For an unknown decoder, a UNETR decoder on an encoder whose
            patch size is not 16 (its four x2 upsamplings), or ``heads.seg_layers``
            that are not three valid block indices.
    """
    model, heads = cfg.model, cfg.heads
    if heads.seg_decoder not in SEG_DECODERS:
        raise ConfigError(f"heads.seg_decoder {heads.seg_decoder!r} is not one of {', '.join(SEG_DECODERS)}")
    if heads.seg_decoder == "unetr" and model.patch_size != _PATCH:
        raise ConfigError(f"the UNETR decoder needs model.patch_size = {_PATCH}, got {model.patch_size}; "
                          "heads.seg_decoder=light takes any patch size")
    skip_layers(cfg)
    if heads.seg_decoder == "light":
        return LightDecoder(model.embed_dim, out_channels, width=heads.seg_feature_size, stride=heads.seg_stride,
                            norm=heads.seg_norm, in_channels=model.in_chans)
    skip = bool(heads.seg_image_skip) if image_skip is None else image_skip
    return UNETRDecoder(model.embed_dim, out_channels, feature_size=heads.seg_feature_size, norm=heads.seg_norm,
                        in_channels=model.in_chans, image_skip=skip)


def skip_layers(cfg: Any) -> tuple[int, int, int]:
    """The encoder blocks the decoder reads: ``heads.seg_layers`` or UNETR's default."""
    depth, chosen = cfg.model.depth, list(cfg.heads.seg_layers)
    if not chosen:
        return default_skip_layers(depth)
    if len(chosen) != 3 or any(not 0 <= i < depth for i in chosen):
        raise ConfigError(f"heads.seg_layers {chosen} must be three block indices in [0, {depth})")
    return tuple(chosen)  # type: ignore[return-value]
