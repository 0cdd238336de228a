"""Building blocks of the 3D ViT: patch and token embeddings, attention, MLP, block.

Every module that owns parameters directly takes exactly one tensor input and
treats each sample independently. That keeps the encoder DP-safe by
construction (STYLE.md, pattern 8): Opacus computes per-sample gradients for
``nn.Linear``, ``nn.LayerNorm`` and ``nn.Conv3d`` with its own grad samplers and
for the small custom modules here (tokens, position embedding, LayerScale, the
patch projection) through functorch, which only sees a module's first input.
No BatchNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


STEMS = ("patch", "conv")


class PatchProjection(nn.Conv3d):
    """ViT's linear patch projection: a Conv3d with kernel and stride ``patch_size``, computed as one matmul.

    The parameters, their initialisation and the state-dict keys are the Conv3d's;
    only the arithmetic differs. Each patch is flattened (channel, x, y, z, as the
    kernel is laid out) and multiplied by the kernel as a (embed_dim, C p^3) matrix,
    which gives the convolution's result up to float rounding (3e-6 at base size).
    On a CPU the convolution's backward is the slow part: the matmul makes the
    projection's forward and backward 1.6x faster in fp32 and 30-60x faster under
    bf16 autocast, where oneDNN's Conv3d backward alone had taken 37% of a base
    training step (benchmarks/RESULTS.md, "The patch projection as a matmul").
    Like the convolution, it drops the voxels past the last whole patch.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        p = self.kernel_size[0]
        b, c = x.shape[:2]
        grid = [n // p for n in x.shape[2:]]
        patches = x[..., :grid[0] * p, :grid[1] * p, :grid[2] * p].reshape(b, c, grid[0], p, grid[1], p, grid[2], p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, grid[0] * grid[1] * grid[2], c * p ** 3)
        tokens = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # B, N, D
        return tokens.transpose(1, 2).reshape(b, self.out_channels, *grid)  # B, D, gx, gy, gz


class PatchEmbed3D(nn.Module):
    """Cut a volume into cubic patches and project each to a token.

    Args:
        patch_size: Patch edge in voxels.
        in_chans: Input channels.
        embed_dim: Token width.
        stem: ``"patch"``: one Conv3d with kernel and stride ``patch_size`` (ViT's
            linear patch projection, :class:`PatchProjection`); ``"conv"``: log2(patch_size) 3^3 stride-2
            convolutions (16, 32, 64, ... channels, capped at ``embed_dim``, each
            with GroupNorm and GELU), then a 1x1x1 projection: the early
            convolutions of Xiao et al. 2021, which keep a lesion a few voxels
            wide that a linear projection of a 16^3 patch averages away.
            Default ``"patch"``.

    Raises:
        ValueError: For sizes below 1, an unknown stem, or a conv stem whose
            patch size is not a power of two.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stem: str = "patch") -> None:
        super().__init__()
        if min(patch_size, in_chans, embed_dim) < 1:
            raise ValueError(f"patch_size, in_chans and embed_dim must be >= 1, "
                             f"got {patch_size}, {in_chans}, {embed_dim}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self.patch_size, self.stem = patch_size, stem
        if stem == "patch":
            self.proj: nn.Module = PatchProjection(patch_size, in_chans, embed_dim)
            return
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"a conv stem halves the grid per layer: patch_size must be a power of two >= 2, "
                             f"got {patch_size}")
        widths = [in_chans] + [min(embed_dim, 16 * 2 ** i) for i in range(patch_size.bit_length() - 1)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            # GroupNorm, not BatchNorm: per-sample statistics keep DP-SGD valid.
            layers += [nn.Conv3d(a, b, 3, stride=2, padding=1), nn.GroupNorm(min(8, b), b), nn.GELU()]
        self.proj = nn.Sequential(*layers, nn.Conv3d(widths[-1], embed_dim, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # B, D, gx, gy, gz


class MaskEmbed(nn.Module):
    """The learnt mask token, spread over the masked cells of a patch grid.

    The input is the float mask itself (1 = masked), so the module has one
    per-sample input and the encoder blends ``tokens * (1 - m) + mask_embed(m)``.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        # Zero start as in BEiT/iBOT/DINOv2: a masked patch begins as "no content".
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, m: Tensor) -> Tensor:
        # m: B, 1, gx, gy, gz
        return m * self.mask_token.view(1, -1, 1, 1, 1)  # B, D, gx, gy, gz


class PositionEmbedding3D(nn.Module):
    """Learnt position embedding on a reference patch grid, resized to any grid.

    The table is laid out for ``grid``; inputs on another grid get it resized
    trilinearly on every call (nothing is cached, so global and local crops of
    different sizes can alternate through one model).

    Args:
        grid: Reference patch grid (gx, gy, gz), e.g. img_size // patch_size.
        embed_dim: Token width.
    """

    def __init__(self, grid: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be 3 positive sizes, got {tuple(grid)}")
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def resized(self, grid: Sequence[int]) -> Tensor:
        """The table on ``grid`` (the stored tensor itself when sizes agree)."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=tuple(grid), mode="trilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: B, D, gx, gy, gz -> tokens in x-major (C) order
        x = x + self.resized(x.shape[2:])
        return x.flatten(2).transpose(1, 2)  # B, N, D


class PrefixTokens(nn.Module):
    """Prepend the CLS token and optional register tokens to the patch tokens.

    The CLS token needs no position embedding of its own: a learnt offset added
    to a learnt vector is the same single learnt vector. Registers (Darcet et al.
    2024, "Vision Transformers Need Registers") carry no position either.

    Args:
        embed_dim: Token width.
        num_register_tokens: Extra learnt tokens placed after CLS.
    """

    def __init__(self, embed_dim: int, num_register_tokens: int = 0) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.num_register_tokens = num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            nn.init.normal_(self.register_tokens, std=1e-6)
        else:
            self.register_tokens = None

    def forward(self, x: Tensor) -> Tensor:
        # x: B, N, D
        prefix = self.cls_token
        if self.register_tokens is not None:
            prefix = torch.cat([prefix, self.register_tokens], dim=1)  # 1, 1+R, D
        return torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)  # B, 1+R+N, D


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, N, D/H
        x = F.scaled_dot_product_attention(q, k, v)  # B, H, N, D/H
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # B, N, D


class Mlp(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples while training.

    Kept samples are rescaled by ``1 / (1 - p)`` so the expectation is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN x))), then the same with an MLP.

    Args:
        dim: Token width.
        num_heads: Attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: Bias on the query/key/value projection.
        layerscale_init: Initial LayerScale value; 0 or less leaves LayerScale out.
        drop_path: Stochastic-depth probability of this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))  # B, N, D
