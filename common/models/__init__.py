"""Image encoder and self-supervision heads."""

from __future__ import annotations

from fedmri.models.dino_head import DINOHead, WeightNormLinear
from fedmri.models.factory import build_encoder, model_kwargs
from fedmri.models.vit3d import ViT3D

__all__ = ["DINOHead", "ViT3D", "WeightNormLinear", "build_encoder", "model_kwargs"]
