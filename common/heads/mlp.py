"""Classification and regression MLPs on pooled features of the frozen encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.errors import ConfigError

# What a pooling is made of: the CLS token, the mean and the max over patch
# tokens. A pooling joins them with "+" ("cls+mean", "cls+mean+max"): max
# pooling keeps a small lesion that the mean dilutes over the whole volume.
POOL_PARTS = ("cls", "mean", "max")
TASKS = ("multiclass", "multilabel", "regression")


def pool_parts(pooling: str) -> list[str]:
    """The parts of ``pooling`` in order, e.g. ``"cls+max"`` -> ``["cls", "max"]``.

    Raises:
        ConfigError: An unknown part or a part named twice.
    """
    parts = str(pooling).split("+")
    if any(p not in POOL_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"pooling {pooling!r} must join distinct parts of {', '.join(POOL_PARTS)} with '+' "
                          "(e.g. 'cls+mean+max')")
    return parts


def pooled_dim(embed_dim: int, pooling: str) -> int:
    """Width of :func:`pool_features` output for an encoder of width ``embed_dim``."""
    return len(pool_parts(pooling)) * embed_dim


def _part(out: Mapping[str, Any], part: str) -> Tensor:
    if part in out:  # "cls", or "mean" / "max" as the feature cache stores them
        return out[part]
    patch = out["patch"]  # B, N, D
    return patch.mean(dim=1) if part == "mean" else patch.amax(dim=1)


def pool_features(out: Mapping[str, Any], pooling: str) -> Tensor:
    """One vector per volume from encoder output (or cached features).

    Args:
        out: Holds ``"cls"`` (B, D) and ``"patch"`` (B, N, D), or precomputed
            ``"mean"`` and ``"max"`` (B, D) as the feature cache stores them.
        pooling: Parts of :data:`POOL_PARTS` joined by ``+``: ``"cls"``,
            ``"mean"`` (of patch tokens), ``"max"`` (of patch tokens, per
            channel), or a concatenation such as ``"cls+mean+max"``.

    Returns:
        (B, k * D) for a pooling of k parts, in the dtype of ``out["cls"]``.
    """
    parts = pool_parts(pooling)
    dtype = out["cls"].dtype
    pooled = [_part(out, p).to(dtype) for p in parts]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)  # B, kD


class MLPHead(nn.Module):
    """LayerNorm -> [Linear -> GELU -> Dropout] -> Linear, for one task.

    No batch norm anywhere, so the head trains under DP-SGD (Opacus).

    Args:
        in_dim: Input feature width (see :func:`pooled_dim`).
        out_dim: Classes (multiclass, >= 2), labels (multilabel) or regression targets.
        task: ``"multiclass"``, ``"multilabel"`` or ``"regression"``.
        hidden_dim: Hidden width; 0 makes the head a linear probe. Default 256.
        dropout: Dropout before each linear layer. Default 0.0.
        target_mean: Regression only: targets are standardised with this mean and
            ``target_std`` for the loss, and predictions come out in target units.
        target_std: Regression only; must be > 0. Default 1.0.

    Raises:
        ConfigError: For an unknown task or an out-of-range size.
    """

    # :meth:`loss` is a mean of per-sample terms, so DP-SGD's per-sample
    # clipping applies to it as is.
    per_sample_decomposable = True

    def __init__(self, in_dim: int, out_dim: int, task: str = "multiclass", *, hidden_dim: int = 256,
                 dropout: float = 0.0, target_mean: float = 0.0, target_std: float = 1.0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"head task {task!r} is not one of {', '.join(TASKS)}")
        if in_dim < 1 or out_dim < 1 or hidden_dim < 0:
            raise ConfigError(f"head sizes must be positive: in_dim={in_dim}, out_dim={out_dim}, "
                              f"hidden_dim={hidden_dim}")
        if task == "multiclass" and out_dim < 2:
            raise ConfigError(f"a multiclass head needs >= 2 classes, got out_dim={out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head dropout {dropout} must be in [0, 1)")
        if target_std <= 0:
            raise ConfigError(f"target_std {target_std} must be > 0")
        self.task = task
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        width = in_dim
        if hidden_dim:
            layers += [nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers += [nn.Dropout(dropout), nn.Linear(width, out_dim)]
        self.net = nn.Sequential(*layers)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, out_dim), or predictions in target units for regression."""
        out = self.net(features)  # B, out_dim
        if self.task == "regression":
            out = out * self.target_std + self.target_mean
        return out

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean task loss of :meth:`forward` output against targets.

        Args:
            output: What :meth:`forward` returned (B, out_dim).
            target: Class indices (B,) for multiclass; 0/1 (B, out_dim) for
                multilabel; values (B, out_dim) or (B,) for regression.
        """
        if self.task == "multiclass":
            return F.cross_entropy(output, target.long())
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))
        target = target.to(output.dtype).reshape(output.shape)
        return F.mse_loss((output - self.target_mean) / self.target_std, (target - self.target_mean) / self.target_std)


class SharedTrunk(nn.Module):
    """LayerNorm -> Dropout -> Linear -> GELU: one hidden layer that every MLP task head reads.

    Five separate heads at hidden width 256 on a ``cls+mean`` feature of
    ``base`` are 2.25% of the encoder's bytes, and a heads round sends them
    every round; one shared first layer keeps each task's own layers on a
    narrow input and takes that under 1% (docs/architecture.md, "Heads on the
    frozen encoder"). No batch norm, so it trains under DP-SGD.

    Args:
        in_dim: Input feature width (see :func:`pooled_dim`).
        width: Output width, > 0.
        dropout: Dropout before the linear layer. Default 0.0.

    Raises:
        ConfigError: For an out-of-range size or dropout.
    """

    def __init__(self, in_dim: int, width: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or width < 1:
            raise ConfigError(f"shared trunk sizes must be positive: in_dim={in_dim}, heads.trunk_dim={width}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head dropout {dropout} must be in [0, 1)")
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, width), nn.GELU())

    def forward(self, features: Tensor) -> Tensor:
        """(B, width) from pooled features (B, in_dim)."""
        return self.net(features)


def trunk_dim(cfg: Any) -> int:
    """``cfg.heads.trunk_dim``, 0 where the config predates it (an older export card or run).

    Raises:
        ConfigError: For a negative width.
    """
    width = int(cfg.heads.get("trunk_dim", 0) or 0)
    if width < 0:
        raise ConfigError(f"heads.trunk_dim {width} must be >= 0 (0: no shared trunk)")
    return width


def build_trunk(cfg: Any) -> SharedTrunk:
    """The :class:`SharedTrunk` of ``cfg.heads`` on ``cfg.model.embed_dim``; needs ``heads.trunk_dim`` > 0."""
    heads = cfg.heads
    return SharedTrunk(pooled_dim(cfg.model.embed_dim, heads.pooling), trunk_dim(cfg), dropout=heads.dropout)


def build_mlp_head(cfg: Any, task: str, out_dim: int, **kwargs: Any) -> MLPHead:
    """An :class:`MLPHead` sized for ``cfg.model.embed_dim`` and ``cfg.heads`` pooling and widths.

    With a shared trunk (``heads.trunk_dim`` > 0) the head reads the trunk's
    output instead of the pooled feature.

    Args:
        cfg: The whole config.
        task: ``"multiclass"``, ``"multilabel"`` or ``"regression"``.
        out_dim: Classes, labels or regression targets.
        **kwargs: ``target_mean`` / ``target_std`` for regression.
    """
    heads = cfg.heads
    in_dim = trunk_dim(cfg) or pooled_dim(cfg.model.embed_dim, heads.pooling)
    return MLPHead(in_dim, out_dim, task, hidden_dim=heads.hidden_dim, dropout=heads.dropout, **kwargs)
