"""The coordinator's federation config: the pipeline of stages and how each is run.

Example (``federation.yaml``)::

    name: demo
    preset: tiny                 # model, SSL and alignment preset for the encoder
    overrides: [ssl.lr=2e-3]     # key=value onto that preset
    min_sites: 2
    stages:
      - {name: pretrain, rounds: 3, local_steps: 20, strategy: {name: fedavg}}
      - {name: align, rounds: 2, local_steps: 20, strategy: {name: fedprox, proximal_mu: 0.01}}
      - {name: evaluate}

Merged like every fedmri config: schema defaults, then the file, then
``key=value`` overrides; unknown keys and wrong types are errors that name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmri.config import load_config
from fedmri.config.loader import apply_overrides
from fedmri.errors import ConfigError, InputError
from fedmri.wire import STAGES


@dataclass
class StageConfig:
    """One stage of the pipeline."""

    # pretrain | align | evaluate.
    name: str = "pretrain"
    # Rounds of this stage (evaluate: how many times to evaluate, normally 1).
    rounds: int = 1
    # Optimisation steps each site runs per round (the site's policy may cap it).
    local_steps: int = 10
    # Aggregation: {name: fedavg|fedprox|fedadam|fedyogi|fedtrimmedavg|fedmedian, ...its parameters}.
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    # Sites that must reply usefully for a round to count; null = the federation's min_sites.
    min_sites: int | None = None
    # Fraction of connected sites sampled per round; null = the federation's fraction.
    fraction: float | None = None
    # Data split the evaluate stage measures on.
    split: str = "val"


def _default_stages() -> list[StageConfig]:
    return [StageConfig("pretrain", rounds=3, local_steps=20), StageConfig("align", rounds=2, local_steps=20),
            StageConfig("evaluate", rounds=1, local_steps=0)]


@dataclass
class FederationConfig:
    """A whole federated run."""

    # Run name: the run folder is <run_root>/<name>.
    name: str = "fedmri"
    # Encoder preset (tiny | small | base, or a YAML path) ...
    preset: str = "tiny"
    # ... and key=value overrides onto it (model.*, ssl.*, align.*).
    overrides: list[str] = field(default_factory=list)
    # Seed of every random choice the coordinator and the sites make for this run.
    seed: int = 0
    # Sites that must take part: the run waits for them at the start, and a
    # round with fewer useful replies leaves the weights unchanged.
    min_sites: int = 2
    # Fraction of connected sites sampled per round (at least min_sites).
    fraction: float = 1.0
    # Seconds to wait for min_sites to connect before failing.
    wait_for_sites_s: float = 300.0
    # Seconds a round waits for replies; late sites are left out of that round.
    round_timeout_s: float = 1800.0
    # An update whose distance from the global weights exceeds this many times
    # the round's median distance is rejected (strategies.validation).
    norm_bound_factor: float = 10.0
    # Folder holding run folders.
    run_root: str = "runs"
    # Continue from the last complete round in <run_root>/<name>.
    resume: bool = False
    # Export the encoder (safetensors + JSON) into the run folder at the end.
    export: bool = True
    stages: list[StageConfig] = field(default_factory=_default_stages)


def load_federation(source: str | Path | None = None, overrides: list[str] | None = None, *,
                    text: str | None = None) -> DictConfig:
    """Read a federation config from a file (or YAML ``text``) and check it.

    Raises:
        InputError: The file is missing or not YAML.
        ConfigError: Unknown keys, wrong types, unknown stages or strategies,
            or an encoder preset that does not load.
    """
    where = "federation config"
    if text is None and source is not None:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"federation config {path} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        cfg = OmegaConf.structured(FederationConfig)
        if text:
            user = OmegaConf.create(text)
            if not isinstance(user, DictConfig):
                raise ConfigError(f"{where}: expected a mapping at the top level")
            cfg = OmegaConf.merge(cfg, user)
        if overrides:
            apply_overrides(cfg, list(overrides), where)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {getattr(exc, 'msg', exc)}") from None
    except Exception as exc:  # YAML errors
        raise InputError(f"{where} is not valid YAML: {exc}") from None
    _check(cfg, where)
    return cfg


def _check(cfg: DictConfig, where: str) -> None:
    from fedmri.strategies import build_aggregator

    if not cfg.stages:
        raise ConfigError(f"{where}: stages is empty; name at least one of {', '.join(STAGES)}")
    if cfg.min_sites < 1 or not 0 < cfg.fraction <= 1:
        raise ConfigError(f"{where}: min_sites must be >= 1 and fraction in (0, 1]")
    for i, stage in enumerate(cfg.stages):
        if stage.name not in STAGES:
            raise ConfigError(f"{where}: stages[{i}].name {stage.name!r} is not one of {', '.join(STAGES)}")
        if stage.rounds < 1 or stage.local_steps < 0:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}) needs rounds >= 1 and local_steps >= 0")
        if stage.name != "evaluate" and stage.local_steps < 1:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}) needs local_steps >= 1")
        try:
            build_aggregator(OmegaConf.to_container(stage.strategy))
        except ConfigError as exc:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}).strategy: {exc}") from None
    run_config(cfg)  # the encoder preset and overrides must load


def run_config(fed: DictConfig) -> DictConfig:
    """The encoder config (FedmriConfig) of a federated run, seeded by the run's seed."""
    return load_config(fed.preset, overrides=[*fed.overrides, f"seed={fed.seed}"])
