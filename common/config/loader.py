"""Config merging in one order everywhere (STYLE.md, pattern 3).

schema defaults -> preset -> user file -> ``key=value`` overrides. Unknown keys,
wrong types and unknown presets raise :class:`fedmri.errors.ConfigError` naming
the key or file and saying what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedmri.config.schema import FedmriConfig
from fedmri.errors import ConfigError


def list_presets() -> list[str]:
    """Names of the presets packaged in ``fedmri/configs``."""
    root = resources.files("fedmri") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of config keys, not a {type(data).__name__}")
    return data


def _preset_dict(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return _read_yaml(path.read_text(encoding="utf-8"), str(path))
    resource = resources.files("fedmri") / "configs" / f"{preset}.yaml"
    if not resource.is_file():
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {', '.join(list_presets())} or give a .yaml file"
        )
    data = _read_yaml(resource.read_text(encoding="utf-8"), f"preset {preset!r}")
    data.setdefault("preset", preset)
    return data


def _merge_step(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise ConfigError(f"unknown config key {exc.full_key!r} in {source}; "
                          "run `fedmri config show` to see the valid keys") from None
    except ValidationError as exc:
        raise ConfigError(f"wrong type for config key {exc.full_key!r} in {source}: {exc.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config in {source}: {exc}") from None


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Turn ``["model.depth=4", ...]`` into a config, rejecting malformed items."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], where: str = "overrides") -> DictConfig:
    """Apply ``key=value`` strings one by one, in place; keys may index lists (``stages.0.rounds=5``).

    Values are YAML (``[a, b]``, ``{name: fedavg}``, ``3``, ``true``). Merging a
    dot-list as one config cannot reach into a list of structured items; this can.

    Raises:
        ConfigError: A malformed item, an unknown key or a value of the wrong type.
    """
    import yaml

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: override {item!r} is not of the form key=value (e.g. model.depth=4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not YAML ({exc})") from None
        try:
            OmegaConf.update(cfg, key.strip(), value, merge=True)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{where}: override {item!r}: {msg}") from None
    return cfg


def load_config(
    preset: str | None = None,
    user_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """Build a resolved, read-only config.

    Args:
        preset: Name of a packaged preset (``tiny``, ``small``, ``base``) or a
            path to a YAML file used as the preset. ``None`` keeps the schema
            defaults.
        user_file: Optional YAML file merged over the preset.
        overrides: ``key=value`` strings merged last.

    Returns:
        A structured, read-only ``DictConfig`` typed by :class:`FedmriConfig`.

    Raises:
        ConfigError: For an unknown preset, missing file, unknown key or wrong type.
    """
    cfg: DictConfig = OmegaConf.structured(FedmriConfig)
    if preset is not None:
        cfg = _merge_step(cfg, _preset_dict(preset), f"preset {preset!r}")
    if user_file is not None:
        path = Path(user_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        cfg = _merge_step(cfg, _read_yaml(path.read_text(encoding="utf-8"), str(path)), str(path))
    if overrides:
        cfg = _merge_step(cfg, parse_overrides(overrides), "overrides")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as written next to every checkpoint."""
    return OmegaConf.to_yaml(cfg, resolve=True)
