"""Build the image encoder from a config section or a preset name (open_clip style)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmri.config.loader import load_config
from fedmri.config.schema import ModelConfig
from fedmri.errors import ConfigError
from fedmri.models.vit3d import ViT3D


def model_kwargs(cfg: DictConfig | ModelConfig | str) -> dict[str, Any]:
    """The ``ViT3D`` constructor arguments a config describes.

    Args:
        cfg: A preset name (``"tiny"``, ``"small"``, ``"base"``), a whole
            fedmri config (its ``model`` section is used), a ``model`` section,
            or a :class:`ModelConfig`.
    """
    if isinstance(cfg, str):
        cfg = load_config(cfg).model
    if isinstance(cfg, ModelConfig):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        if "model" in cfg:
            cfg = cfg.model
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    raise ConfigError(f"build_encoder takes a preset name, a config or a ModelConfig, not {type(cfg).__name__}")


def build_encoder(cfg: DictConfig | ModelConfig | str) -> ViT3D:
    """Build the 3D ViT that ``cfg`` describes.

    Args:
        cfg: See :func:`model_kwargs`.

    Returns:
        A freshly initialised :class:`ViT3D`.

    Raises:
        ConfigError: For an unknown preset or sizes the encoder rejects (the
            message names the offending ``model.*`` value).
    """
    kwargs = model_kwargs(cfg)
    try:
        return ViT3D(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid model config: {exc}; fix the model.* keys") from None
