"""Configuration: schema, presets and the one merge order."""

from fedmri.config.loader import list_presets, load_config, parse_overrides, to_yaml
from fedmri.config.schema import (
    AlignConfig,
    CatalogConfig,
    DataConfig,
    FedmriConfig,
    HeadsConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
)

__all__ = [
    "AlignConfig",
    "CatalogConfig",
    "DataConfig",
    "FedmriConfig",
    "HeadsConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "list_presets",
    "load_config",
    "parse_overrides",
    "to_yaml",
]
