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

Differential privacy is asked for per stage (the sites' own ``policy.dp`` may
require it and caps what they spend)::

      - {name: pretrain, rounds: 3, local_steps: 20,
         dp: {enabled: true, target_epsilon: 8.0, max_grad_norm: 1.0},
         site_dp: {mode: central, noise_multiplier: 1.0, clip_norm: 5.0}}

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
from fedmri.protocol import UPLINKS
from fedmri import stages as stage_registry


SITE_DP_MODES = ("off", "central", "local", "distributed")


@dataclass
class SampleDPConfig:
    """Sample-level DP-SGD at the sites (each site also applies its own policy.dp)."""

    # Train this stage with DP-SGD at every site (pretrain, align).
    enabled: bool = False
    # Noise multiplier σ; null = each site derives σ from target_epsilon.
    noise_multiplier: float | None = None
    # ε each site should spend on this stage over all its rounds, at the site's δ.
    target_epsilon: float | None = None
    # Per-sample clipping norm C.
    max_grad_norm: float = 1.0


@dataclass
class SiteDPConfig:
    """Site-level DP: each site's whole update is clipped and Gaussian noise is added."""

    # off | central (the coordinator clips and adds noise to the aggregate: protects
    # sites from whoever receives the model) | local (each site clips and noises its
    # own update before it leaves: also protects it from the coordinator) | distributed
    # (under secure_aggregation each site adds its share z C / sqrt(m) of the noise, so the
    # sum the coordinator sees carries central DP's noise z C).
    mode: str = "off"
    # Noise multiplier z: noise std z * clip_norm (central: on the sum of the updates).
    noise_multiplier: float = 1.0
    # Most L2 norm of one site's update (all trained tensors together).
    clip_norm: float = 1.0
    # δ at which the coordinator reports central site-level ε.
    delta: float = 1e-5


@dataclass
class SecureAggregationConfig:
    """SecAgg+ (fedmri.secagg): the coordinator learns only the sum of the sites' updates."""

    # Mask every site's update of this training stage (fedavg, fedprox, fedadam, fedyogi).
    enabled: bool = False
    # Most L2 norm of one site's update: each site clips to it before masking (it replaces the
    # coordinator's norm bound, which cannot see single updates). Pick it above the usual norm.
    clip_norm: float = 10.0
    # A site's weight (its example count) is capped at this; with clip_norm and the number of
    # sites it sets the fixed-point scale that keeps the 32-bit sum from overflowing.
    max_weight: float = 10000.0
    # Neighbours per site in SecAgg+'s graph; 0 = every other site (SecAgg).
    neighbours: int = 0
    # Fraction of a site's share holders whose shares rebuild its secrets; at least a majority.
    threshold: float = 0.5


@dataclass
class StageConfig:
    """One stage of the pipeline."""

    # pretrain | align | heads | evaluate.
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
    dp: SampleDPConfig = field(default_factory=SampleDPConfig)
    site_dp: SiteDPConfig = field(default_factory=SiteDPConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)


def _default_stages() -> list[StageConfig]:
    return [StageConfig("pretrain", rounds=3, local_steps=20), StageConfig("align", rounds=2, local_steps=20),
            StageConfig("heads", rounds=2, local_steps=20), StageConfig("evaluate", rounds=1, local_steps=0)]


@dataclass
class MLflowConfig:
    """A run's rows, configs and reports in MLflow (fedmri.server.tracking; pip install 'fedmri[mlflow]')."""

    enabled: bool = False
    # Tracking URI (a server, a database, a folder); null: a file store in <run_root>/mlruns.
    uri: str | None = None
    # Experiment; null: the run name's first part ("demo" for demo/federated and its baselines).
    experiment: str | None = None


@dataclass
class TrackingConfig:
    """Where a run's rows go besides metrics.jsonl (fedmri.server.tracking)."""

    # TensorBoard event files in <run>/tensorboard/<site>/: `tensorboard --logdir runs`.
    tensorboard: bool = True
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


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
    # Megabytes of a round's site updates the coordinator holds in memory; the rest wait in
    # the run folder (updates-*/, removed after the round) until the round aggregates them.
    update_memory_mb: float = 1024.0
    # Complete rounds kept in <run>/ckpt, the newest ones (resume needs 1).
    keep_checkpoints: int = 2
    # Folder holding run folders.
    run_root: str = "runs"
    # Continue from the last complete round in <run_root>/<name>.
    resume: bool = False
    # Export the encoder (safetensors + JSON) into the run folder at the end.
    export: bool = True
    # Send each site only the parameter groups whose digest it has not acknowledged; it takes
    # the rest from its cache (server/downlink.py). false: every down group every round (debugging).
    group_cache: bool = True
    # How sites send their updates: "float32", or "bf16": each value's difference from what the
    # site was sent, rounded to bfloat16, half the bytes; the coordinator adds it to its float32
    # copy (fedmri.wire.to_delta_record). Ignored by secure-aggregation rounds, whose masked
    # integers have their own encoding. Effect on results: benchmarks/RESULTS.md.
    uplink: str = "float32"
    # How the coordinator sends the groups a round trains: "float32", or "bf16", rounded to
    # bfloat16 (half the bytes); needs uplink bf16, since each site's update then comes as a
    # difference and the coordinator keeps its float32 copy. The teacher follows the rounded
    # student, so the sites still rebuild it. Ignored by secure-aggregation rounds.
    downlink: str = "float32"
    # Experiment tracking: the same rows as metrics.jsonl, in the trackers' own formats.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
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
    check_federation(cfg, where)
    return cfg


def check_federation(cfg: DictConfig, where: str) -> None:
    """Check a merged federation config (stages, sites, DP, strategies, the encoder preset).

    Raises:
        ConfigError: Naming ``where`` and the first problem.
    """
    from fedmri.strategies import build_aggregator

    if not cfg.stages:
        raise ConfigError(f"{where}: stages is empty; name at least one of {', '.join(stage_registry.names())}")
    if cfg.min_sites < 1 or not 0 < cfg.fraction <= 1:
        raise ConfigError(f"{where}: min_sites must be >= 1 and fraction in (0, 1]")
    if not cfg.update_memory_mb >= 0:
        raise ConfigError(f"{where}: update_memory_mb must be >= 0 (0 spills every update to disk), "
                          f"got {cfg.update_memory_mb}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"{where}: keep_checkpoints must be >= 1 (resume needs the last round), "
                          f"got {cfg.keep_checkpoints}")
    for name in ("uplink", "downlink"):
        if cfg[name] not in UPLINKS:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(UPLINKS)}, got {cfg[name]!r}")
    if cfg.downlink == "bf16" and cfg.uplink != "bf16":
        raise ConfigError(f"{where}: downlink bf16 needs uplink: bf16 (the sites must send differences, or "
                          "the float32 copy that keeps small updates is lost)")
    for i, stage in enumerate(cfg.stages):
        if stage.name not in stage_registry.names():
            raise ConfigError(f"{where}: stages[{i}].name {stage.name!r} is not one of "
                              f"{', '.join(stage_registry.names())}")
        if stage.rounds < 1 or stage.local_steps < 0:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}) needs rounds >= 1 and local_steps >= 0")
        if stage_registry.get(stage.name).trains and stage.local_steps < 1:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}) needs local_steps >= 1")
        _check_dp(stage, f"{where}: stages[{i}] ({stage.name})")
        try:
            build_aggregator(OmegaConf.to_container(stage.strategy))
        except ConfigError as exc:
            raise ConfigError(f"{where}: stages[{i}] ({stage.name}).strategy: {exc}") from None
    run_cfg = run_config(cfg)  # the encoder preset and overrides must load
    for i, stage in enumerate(cfg.stages):
        check = stage_registry.get(stage.name).check
        if check is not None:
            check(run_cfg, stage, f"{where}: stages[{i}] ({stage.name})")


def _check_dp(stage: DictConfig, where: str) -> None:
    dp, site = stage.dp, stage.site_dp
    _check_secagg(stage, where)
    training = stage_registry.get(stage.name).trains
    trained = ", ".join(stage_registry.names(trains=True))
    if dp.enabled:
        if not training:
            raise ConfigError(f"{where}: dp.enabled is for the training stages ({trained})")
        if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
            raise ConfigError(f"{where}: dp needs exactly one of noise_multiplier and target_epsilon")
        for key in ("noise_multiplier", "target_epsilon", "max_grad_norm"):
            if dp[key] is not None and not dp[key] > 0:
                raise ConfigError(f"{where}: dp.{key} must be > 0, got {dp[key]}")
    if site.mode not in SITE_DP_MODES:
        raise ConfigError(f"{where}: site_dp.mode {site.mode!r} is not one of {', '.join(SITE_DP_MODES)}")
    if site.mode != "off":
        if not training:
            raise ConfigError(f"{where}: site_dp is for the training stages ({trained})")
        if not (site.noise_multiplier > 0 and site.clip_norm > 0 and 0 < site.delta < 1):
            raise ConfigError(f"{where}: site_dp needs noise_multiplier > 0, clip_norm > 0 and delta in (0, 1)")
        if site.mode == "distributed" and not stage.secure_aggregation.enabled:
            raise ConfigError(f"{where}: distributed site_dp adds the noise in shares that only sum to central DP's "
                              "noise under secure aggregation; set secure_aggregation.enabled: true")
        if site.mode in ("central", "distributed") and stage.strategy.get("name") not in ("fedavg", "fedprox"):
            raise ConfigError(f"{where}: {site.mode} site_dp adds its noise to the mean of the clipped updates, so "
                              f"it needs strategy fedavg or fedprox, not {stage.strategy.get('name')!r}; or use "
                              "site_dp mode local")


SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


def _check_secagg(stage: DictConfig, where: str) -> None:
    sec = stage.secure_aggregation
    if not sec.enabled:
        return
    if not stage_registry.get(stage.name).trains:
        raise ConfigError(f"{where}: secure_aggregation is for the training stages "
                          f"({', '.join(stage_registry.names(trains=True))})")
    if stage.strategy.get("name") not in SECAGG_STRATEGIES:
        raise ConfigError(f"{where}: secure aggregation gives the coordinator only the sum of the updates, so the "
                          f"strategy must be one of {', '.join(SECAGG_STRATEGIES)}, not {stage.strategy.get('name')!r}")
    if stage.site_dp.mode == "central":
        raise ConfigError(f"{where}: central site_dp clips each site's update at the coordinator, which secure "
                          "aggregation hides; use site_dp mode local")
    if not (sec.clip_norm > 0 and sec.max_weight >= 1 and sec.neighbours >= 0 and 0 <= sec.threshold <= 1):
        raise ConfigError(f"{where}: secure_aggregation needs clip_norm > 0, max_weight >= 1, neighbours >= 0 and "
                          "threshold in [0, 1]")


def dp_request(stage: DictConfig) -> dict[str, Any]:
    """The request fields (fedmri.protocol.TrainRequest) that ask sites for DP in ``stage`` (none when off)."""
    out: dict[str, Any] = {}
    dp, site = stage.dp, stage.site_dp
    if dp.enabled:
        out |= {"dp": True, "dp_max_grad_norm": float(dp.max_grad_norm)}
        if dp.noise_multiplier is not None:
            out["dp_noise_multiplier"] = float(dp.noise_multiplier)
        else:
            out["dp_target_epsilon"] = float(dp.target_epsilon)
    if site.mode != "off":
        out |= {"site_dp": str(site.mode), "site_dp_noise_multiplier": float(site.noise_multiplier),
                "site_dp_clip_norm": float(site.clip_norm)}
    return out


def run_config(fed: DictConfig) -> DictConfig:
    """The encoder config (FedmriConfig) of a federated run, seeded by the run's seed."""
    return load_config(fed.preset, overrides=[*fed.overrides, f"seed={fed.seed}"])
