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

from monai.losses import DiceCELoss
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
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


def build_segmentation_head(cfg: Any, out_channels: int, *, image_skip: bool = True) -> UNETRDecoder:
    """A :class:`UNETRDecoder` for the encoder of ``cfg.model`` with ``cfg.heads`` settings.

    Raises:
        ConfigError: If the encoder's patch size is not 16 (UNETR's four x2
            upsamplings) or ``heads.seg_layers`` is not three valid block indices.
    """
    model, heads = cfg.model, cfg.heads
    if model.patch_size != _PATCH:
        raise ConfigError(f"the UNETR decoder needs model.patch_size = {_PATCH}, got {model.patch_size}")
    skip_layers(cfg)
    return UNETRDecoder(model.embed_dim, out_channels, feature_size=heads.seg_feature_size, norm=heads.seg_norm,
                        in_channels=model.in_chans, image_skip=image_skip)


def skip_layers(cfg: Any) -> tuple[int, int, int]:
    """The encoder blocks the decoder reads: ``heads.seg_layers`` or UNETR's default."""
    depth, chosen = cfg.model.depth, list(cfg.heads.seg_layers)
    if not chosen:
        return default_skip_layers(depth)
    if len(chosen) != 3 or any(not 0 <= i < depth for i in chosen):
        raise ConfigError(f"heads.seg_layers {chosen} must be three block indices in [0, {depth})")
    return tuple(chosen)  # type: ignore[return-value]
