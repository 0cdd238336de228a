"""The 3D vision transformer image encoder (docs/architecture.md, "The model").

Dosovitskiy et al. 2021 (ViT) with the DINOv2 additions (Oquab et al. 2024):
mask token for masked image modelling, LayerScale, stochastic depth, optional
register tokens, and a learnt position embedding resized to any crop size.
MONAI's ``ViT`` has neither the mask token nor the resizing, both needed by the
multi-crop self-supervision in :mod:`fedmri.ssl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedmri.models.layers import Block, MaskEmbed, PatchEmbed3D, PositionEmbedding3D, PrefixTokens


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class ViT3D(nn.Module):
    """Pre-norm ViT over 3D volumes; returns CLS, patch tokens and chosen layers.

    Args:
        img_size: Reference input size (X, Y, Z) the position embedding is laid
            out for; each must be a multiple of ``patch_size``. Default (96, 96, 96).
        patch_size: Cubic patch edge in voxels. Default 16.
        in_chans: Input channels. Default 1.
        embed_dim: Token width; a multiple of ``num_heads``. Default 768.
        depth: Number of transformer blocks. Default 12.
        num_heads: Attention heads. Default 12.
        mlp_ratio: MLP hidden width over ``embed_dim``. Default 4.0.
        qkv_bias: Bias on the query/key/value projection. Default True.
        layerscale_init: Initial LayerScale value; 0 leaves LayerScale out. Default 1e-5.
        drop_path_rate: Stochastic depth of the last block, linear from 0 at the
            first; in [0, 1). Default 0.0.
        num_register_tokens: Register tokens (returned neither as CLS nor patch). Default 0.
        stem: Patch embedding, ``"patch"`` (one linear projection per patch) or
            ``"conv"`` (stride-2 convolutions; :class:`~fedmri.models.layers.PatchEmbed3D`).
            Default ``"patch"``.

    Raises:
        ValueError: For any argument out of range, naming it and its value.
    """

    def __init__(
        self,
        img_size: Sequence[int] = (96, 96, 96),
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float = 1e-5,
        drop_path_rate: float = 0.0,
        num_register_tokens: int = 0,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        img_size = tuple(int(s) for s in img_size)
        _check(len(img_size) == 3, f"img_size must have 3 entries (X, Y, Z), got {img_size}")
        _check(patch_size >= 1, f"patch_size must be >= 1, got {patch_size}")
        _check(all(s >= patch_size and s % patch_size == 0 for s in img_size),
               f"img_size {img_size} must be positive multiples of patch_size {patch_size}")
        _check(in_chans >= 1, f"in_chans must be >= 1, got {in_chans}")
        _check(num_heads >= 1, f"num_heads must be >= 1, got {num_heads}")
        _check(embed_dim >= 1 and embed_dim % num_heads == 0,
               f"embed_dim {embed_dim} must be a positive multiple of num_heads {num_heads}")
        _check(depth >= 1, f"depth must be >= 1, got {depth}")
        _check(mlp_ratio > 0, f"mlp_ratio must be > 0, got {mlp_ratio}")
        _check(layerscale_init >= 0, f"layerscale_init must be >= 0 (0 = off), got {layerscale_init}")
        _check(0.0 <= drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        _check(num_register_tokens >= 0, f"num_register_tokens must be >= 0, got {num_register_tokens}")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens

        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim, stem)
        self.mask_embed = MaskEmbed(embed_dim)
        self.pos_embed = PositionEmbedding3D(self.grid_size(img_size), embed_dim)
        self.prefix = PrefixTokens(embed_dim, num_register_tokens)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layerscale_init, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_weights)

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid (gx, gy, gz) of an input of ``spatial_shape`` voxels.

        Raises:
            ValueError: If the shape is not 3D or not a multiple of ``patch_size``.
        """
        shape = tuple(int(s) for s in spatial_shape)
        p = self.patch_size
        if len(shape) != 3 or any(s < p or s % p for s in shape):
            raise ValueError(f"input spatial shape {shape} must be 3 positive multiples of patch_size {p}")
        return shape[0] // p, shape[1] // p, shape[2] // p

    def forward(
        self,
        x: Tensor,
        masks: Tensor | None = None,
        return_layers: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Encode a batch of volumes.

        Args:
            x: Volumes (B, C, X, Y, Z); X, Y, Z multiples of ``patch_size``.
            masks: Optional (B, N) bool, N = gx * gy * gz in x-major order; True
                replaces that patch token by the mask token (iBOT).
            return_layers: Block indices (negative counts from the end) whose
                patch tokens, after the final norm, to return in this order.

        Returns:
            ``{"cls": (B, D), "patch": (B, N, D), "layers": [(B, N, D), ...],
            "grid": (gx, gy, gz)}``.
        """
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, X, Y, Z), got {tuple(x.shape)}")
        grid = self.grid_size(x.shape[2:])
        wanted = self._layer_indices(return_layers)

        t = self.patch_embed(x)  # B, D, gx, gy, gz
        if masks is not None:
            n = grid[0] * grid[1] * grid[2]
            if masks.shape != (x.shape[0], n):
                raise ValueError(f"masks must be (B, N) = ({x.shape[0]}, {n}), got {tuple(masks.shape)}")
            m = masks.view(x.shape[0], 1, *grid).to(t.dtype)  # B, 1, gx, gy, gz
            t = t * (1 - m) + self.mask_embed(m)
        t = self.prefix(self.pos_embed(t))  # B, 1+R+N, D

        first_patch = 1 + self.num_register_tokens
        kept: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            t = block(t)
            if i in wanted:
                kept[i] = self.norm(t[:, first_patch:])  # B, N, D
        t = self.norm(t)
        layers = [kept[i] for i in wanted]
        return {"cls": t[:, 0], "patch": t[:, first_patch:], "layers": layers, "grid": grid}

    def _layer_indices(self, return_layers: Sequence[int]) -> list[int]:
        out = []
        for i in return_layers:
            if not -self.depth <= i < self.depth:
                raise ValueError(f"return_layers entry {i} is out of range for depth {self.depth}")
            out.append(i % self.depth)
        return out


def _init_weights(module: nn.Module) -> None:
    # timm/DINOv2 ViT init: truncated normal linear weights, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
