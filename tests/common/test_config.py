"""Config merge order, presets and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedmri.config import FedmriConfig, list_presets, load_config, to_yaml
from fedmri.errors import ConfigError


def test_presets_are_packaged() -> None:
    assert {"micro", "tiny", "small", "base"} <= set(list_presets())


# What the micro preset adds to tiny (common/configs/micro.yaml): the encoder of the
# pipeline tests and benchmarks, which pasted these overrides onto tiny before.
MICRO_OVERRIDES = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "ssl.head_hidden_dim=64",
                   "ssl.head_bottleneck_dim=16", "ssl.local_crops_number=2", "align.embed_dim=32"]


def test_micro_is_tiny_shrunk() -> None:
    micro = OmegaConf.to_container(load_config("micro"))
    tiny = OmegaConf.to_container(load_config("tiny", overrides=MICRO_OVERRIDES))
    assert (micro.pop("preset"), tiny.pop("preset")) == ("micro", "tiny")
    assert micro == tiny


@pytest.mark.parametrize(
    ("preset", "width", "depth", "heads"),
    [("tiny", 96, 4, 3), ("small", 384, 12, 6), ("base", 768, 12, 12)],
)
def test_preset_sizes(preset: str, width: int, depth: int, heads: int) -> None:
    cfg = load_config(preset)
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (width, depth, heads)
    assert cfg.preset == preset
    # The model's input grid is what preprocessing produces.
    assert list(cfg.model.img_size) == list(cfg.data.preprocess.target_shape)


def test_merge_order_schema_preset_file_overrides(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("model:\n  depth: 7\n  num_heads: 6\nseed: 11\n")
    cfg = load_config("tiny", user, ["model.depth=9"])
    assert cfg.model.depth == 9  # override beats file
    assert cfg.model.num_heads == 6  # file beats preset (tiny has 3)
    assert cfg.model.embed_dim == 96  # preset beats schema (768)
    assert cfg.model.mlp_ratio == FedmriConfig().model.mlp_ratio  # schema default
    assert cfg.seed == 11


def test_no_preset_gives_schema_defaults() -> None:
    cfg = load_config()
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(FedmriConfig))


def test_config_is_read_only() -> None:
    cfg = load_config("tiny")
    with pytest.raises(Exception):
        cfg.model.depth = 3


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config("small", overrides=["seed=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(None, path) == cfg


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.dept=3"], "model.dept"),
        (["nonsense=1"], "nonsense"),
        (["model.depth=three"], "model.depth"),
        (["data.preprocess.target_spacing=abc"], "data.preprocess.target_spacing"),
        (["model.depth"], "model.depth"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config("tiny", overrides=overrides)


def test_unknown_key_in_user_file_names_file_and_key(tmp_path: Path) -> None:
    user = tmp_path / "site.yaml"
    user.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config("tiny", user)
    assert "model.widht" in str(err.value) and str(user) in str(err.value)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config("huge")


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "nope.yaml")


def test_non_mapping_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("tiny", bad)


def test_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", bad)


def test_preset_can_be_a_file(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("model:\n  depth: 2\n")
    assert load_config(str(preset)).model.depth == 2
