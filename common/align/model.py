"""The aligned two-tower model: image encoder, text tower, projections, logit scale.

CLIP's layout (Radford et al. 2021) on a 3D ViT and a BERT-family text tower:
both towers are linearly projected into one shared, L2-normalised space
(Decipher-MR: 512-d). The losses live in :mod:`fedmri.losses` and
:mod:`fedmri.align.objective`; this module holds only what an export needs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.errors import ConfigError
from fedmri.heads.mlp import pool_features, pooled_dim
from fedmri.text.tower import TextTower

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP's t' = log 10
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the scale at 100
LOSSES = ("clip", "siglip")


class AlignedModel(nn.Module):
    """Image and text towers projected to one shared space.

    Args:
        image_encoder: A :class:`fedmri.models.ViT3D` (or anything with its
            forward contract and an ``embed_dim``).
        text_tower: The :class:`fedmri.text.TextTower`.
        embed_dim: Shared space width. Default 512.
        image_pooling: How image tokens become one vector (:func:`fedmri.heads.pool_features`).
        logit_scale_init: Initial log of the logit scale. Default ln(1/0.07).
        logit_scale_max: The log scale is clamped at this in :meth:`forward`. Default ln 100.
        logit_bias_init: Initial logit bias (SigLIP); ``None`` = no bias parameter.

    Raises:
        ConfigError: For a non-positive ``embed_dim`` or an unknown pooling.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_tower: TextTower,
        *,
        embed_dim: int = 512,
        image_pooling: str = "cls",
        logit_scale_init: float = CLIP_LOGIT_SCALE_INIT,
        logit_scale_max: float = LOGIT_SCALE_MAX,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ConfigError(f"align.embed_dim {embed_dim} must be >= 1")
        if logit_scale_init > logit_scale_max:
            raise ConfigError(f"align.logit_scale_init {logit_scale_init} exceeds "
                              f"align.logit_scale_max {logit_scale_max}")
        self.image_encoder = image_encoder
        self.text_tower = text_tower
        self.embed_dim = embed_dim
        self.image_pooling = image_pooling
        self.logit_scale_max = float(logit_scale_max)
        # No biases: the features are L2-normalised after projection, and CLIP's
        # projections are plain matrices too.
        self.image_proj = nn.Linear(pooled_dim(image_encoder.embed_dim, image_pooling), embed_dim, bias=False)
        self.text_proj = nn.Linear(text_tower.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor(float(logit_bias_init)))
        self.freeze_image_encoder = False

    def set_trainable(self, *, image_encoder: bool, text_layers: int) -> None:
        """Choose what trains; projections, logit scale and bias always do.

        Args:
            image_encoder: Train the image encoder (False freezes it, eval mode).
            text_layers: Top text layers that train: 0 = frozen, -1 = all.
        """
        self.freeze_image_encoder = not image_encoder
        self.image_encoder.requires_grad_(image_encoder)
        self.text_tower.set_trainable_layers(text_layers)
        self.train(self.training)

    def train(self, mode: bool = True) -> AlignedModel:
        super().train(mode)
        if self.freeze_image_encoder:  # a frozen encoder runs without stochastic depth
            self.image_encoder.eval()
        self.text_tower.train(mode)
        return self

    def _no_grad_if_frozen(self, module: nn.Module) -> contextlib.AbstractContextManager[Any]:
        frozen = not any(p.requires_grad for p in module.parameters())
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, E) from volumes (B, C, X, Y, Z)."""
        with self._no_grad_if_frozen(self.image_encoder):
            pooled = pool_features(self.image_encoder(images), self.image_pooling)  # B, D
        return F.normalize(self.image_proj(pooled), dim=-1)  # B, E

    def encode_text(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                    pooled: Tensor | None = None) -> Tensor:
        """L2-normalised text embeddings (B, E).

        Args:
            input_ids: Token ids (B, L).
            attention_mask: Padding mask (B, L).
            pooled: Instead of tokens, the tower's pooled output (B, H) computed
                earlier: with a frozen tower, a site can encode its reports once
                per run and train the projection on those.
        """
        if pooled is None:
            if input_ids is None or attention_mask is None:
                raise ValueError("encode_text needs input_ids and attention_mask, or pooled tower output")
            with self._no_grad_if_frozen(self.text_tower):
                pooled = self.text_tower(input_ids, attention_mask)  # B, H
        return F.normalize(self.text_proj(pooled), dim=-1)  # B, E

    def scale(self) -> Tensor:
        """The logit scale, exp(clamp(log scale, max)): clamped in the graph, so
        no trainer has to remember to clamp the parameter after each step."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def forward(self, images: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                text_pooled: Tensor | None = None) -> dict[str, Tensor | None]:
        """Both embeddings plus the logit scale and bias, as the losses take them.

        Args:
            images: Volumes (B, C, X, Y, Z).
            input_ids: Report token ids (B, L).
            attention_mask: Their padding mask (B, L).
            text_pooled: Precomputed pooled tower output (B, H) instead of tokens
                (see :meth:`encode_text`).

        Returns:
            ``{"image_features": (B, E), "text_features": (B, E),
            "logit_scale": (), "logit_bias": () or None}``.
        """
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(input_ids, attention_mask, pooled=text_pooled),
            "logit_scale": self.scale(),
            "logit_bias": self.logit_bias,
        }


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} {value!r} is not one of {', '.join(choices)}")


def build_aligned_model(
    cfg: Any,
    image_encoder: nn.Module | None = None,
    text_tower: TextTower | None = None,
) -> AlignedModel:
    """Build the aligned model that a config describes, with its trainable parts set.

    Args:
        cfg: The whole config (``cfg.model`` for the image encoder, ``cfg.align``).
        image_encoder: A pretrained encoder to use; default a fresh one from ``cfg.model``.
        text_tower: A loaded tower to use; default loaded from ``cfg.align.text_model``.

    Raises:
        ConfigError: For an unknown loss, pooling or trainable-layer count.
    """
    align = cfg.align
    _check_choice("align.loss", align.loss, LOSSES)
    pooled_dim(1, align.image_pooling)
    if image_encoder is None:
        from fedmri.models import build_encoder

        image_encoder = build_encoder(cfg)
    if text_tower is None:
        from fedmri.text.tower import build_text_tower

        text_tower = build_text_tower(align)
    siglip = align.loss == "siglip"
    init = align.logit_scale_init
    if init is None:
        init = SIGLIP_LOGIT_SCALE_INIT if siglip else CLIP_LOGIT_SCALE_INIT
    model = AlignedModel(
        image_encoder, text_tower, embed_dim=align.embed_dim, image_pooling=align.image_pooling,
        logit_scale_init=init, logit_scale_max=align.logit_scale_max,
        logit_bias_init=align.logit_bias_init if siglip else None,
    )
    model.set_trainable(image_encoder=not align.freeze_image_encoder, text_layers=align.text_trainable_layers)
    return model
