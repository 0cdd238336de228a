"""The site's own configuration, ``site.yaml``, owned by the site admin.

It says where the site's catalog is, which hardware the client may use, how
its SuperNode reaches the coordinator and which rules the site keeps whatever
the coordinator asks. The ClientApp reads it from the path in the SuperNode's
node config (``site-config``): paths sent by the server are never trusted.

Example::

    name: site-01
    catalog: /data/fedmri/catalog      # made by `fedmri data index`
    device: cpu
    threads: 2
    batch_size: 4
    server:
      address: coordinator.example.org:9092
      root_certificates: /etc/fedmri/ca.crt
      node_key: /etc/fedmri/site-01.key
    policy:
      stages: [pretrain, align, heads, evaluate, search]
      max_local_steps: 100
      metrics: ["*"]                 # which metrics may leave the site
      dp:
        required: true               # train only under differential privacy
        epsilon_total: 8.0           # ε over all runs, counted in the privacy ledger
        epsilon_per_run: 4.0
        delta: 1.0e-5
        unit: patient                # ε per patient (all its series clipped as one); series: per series
      secure_aggregation: false      # true: train only when the coordinator sees just the sum

Relative paths are resolved against the folder holding ``site.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmri import stages as stage_registry
from fedmri.client.privacy.ledger import UNITS
from fedmri.errors import ConfigError, InputError

# Besides the pipeline's stages (fedmri.stages), a site can answer federated
# searches (`fedmri search`: pseudonymous series ids and scores leave the site).
SEARCH = "search"


def known_stages() -> list[str]:
    """What a site can take part in: every registered stage, and search."""
    return [*stage_registry.names(), SEARCH]


@dataclass
class ServerConnection:
    """How this site's SuperNode reaches the coordinator's SuperLink."""

    # SuperLink Fleet API address, HOST:PORT.
    address: str = "127.0.0.1:9092"
    # CA certificate that signed the SuperLink's certificate (from the coordinator).
    root_certificates: str | None = None
    # This site's private node key, OpenSSH format (from `fedmri certs`), mode 0600.
    node_key: str | None = None
    # Plain-text gRPC without TLS or node authentication: for local tests only.
    insecure: bool = False
    # Port of the SuperNode's own ClientAppIo API; 0 picks the Flower default.
    clientappio_port: int = 0


@dataclass
class PrivacyPolicy:
    """The site's differential-privacy rules; ε is counted in the site's privacy ledger."""

    # Training rounds must run with sample-level DP-SGD (or local site-level DP);
    # a request without it is declined.
    required: bool = False
    # Most ε this site spends over all runs (null = no limit). A round that would
    # pass it is declined, so the ledger never shows more.
    epsilon_total: float | None = None
    # Most ε this site spends in one run (null = no limit).
    epsilon_per_run: float | None = None
    # δ of the site's (ε, δ) guarantee; well below 1 / (series at the site).
    delta: float = 1e-5
    # The privacy ledger (SQLite); null = privacy-ledger.sqlite in the catalog folder.
    # Back it up with the catalog: deleting it forgets the privacy already spent.
    ledger: str | None = None
    # What DP-SGD protects: "patient" samples patients and clips the sum of each patient's
    # gradients as one, so ε holds for a patient whatever their number of series; "series"
    # clips each series (each image-report pair in alignment) alone, so a patient with k
    # series is protected only as a group of k.
    unit: str = "patient"


@dataclass
class SitePolicy:
    """Rules the ClientApp enforces whatever the server sends."""

    # Stages this site takes part in, and "search" to answer federated searches;
    # a request for anything else is declined.
    stages: list[str] = field(default_factory=known_stages)
    # Most local optimisation steps the site runs in one round.
    max_local_steps: int = 1000
    # Metrics that may leave the site, as shell patterns ("*_loss", "knn_*"); the
    # protocol's own numbers (num-examples, steps, declined, wall-time-s, bytes-*,
    # dp-*) always go, since the coordinator needs them to aggregate and account.
    metrics: list[str] = field(default_factory=lambda: ["*"])
    dp: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # The fedmri versions of a coordinator this site works with, a PEP 440 range
    # (">=0.9,<0.10"); null = any. Checked on the app bundle before it is installed
    # (fedmri.client.guard) and on every request, which is declined outside it.
    fedmri_versions: str | None = None
    # Training rounds must use secure aggregation (the coordinator sees only the sum of
    # the sites' updates); a request without it is declined.
    secure_aggregation: bool = False


@dataclass
class SiteConfig:
    """The whole ``site.yaml``."""

    # Site name shown to the coordinator in metrics (not a patient identifier).
    name: str = "site"
    # Catalog folder made by `fedmri data index` (holds catalog.sqlite).
    catalog: str = "catalog"
    # torch device for local training: "cpu", "cuda", "cuda:1".
    device: str = "cpu"
    # CPU threads for torch; 0 leaves torch's default.
    threads: int = 0
    # Local batch size: pick it for this site's hardware.
    batch_size: int = 4
    # Data-loading worker processes.
    num_workers: int = 0
    # More catalogs pooled with `catalog` (the centralized baseline of
    # `fedmri simulate`; a real site has one catalog). Each keeps its splits.
    extra_catalogs: list[str] = field(default_factory=list)
    # A catalog of public series, no patient's (a public dataset indexed with `fedmri data
    # index`): DP-SGD pretraining may compute its KoLeo term on them (ssl.dp_public_koleo).
    # Never counted as the site's data, never in the privacy ledger; null = none.
    public_catalog: str | None = None
    server: ServerConnection = field(default_factory=ServerConnection)
    policy: SitePolicy = field(default_factory=SitePolicy)


def load_site(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Read and check ``site.yaml``; paths in it become absolute.

    Args:
        path: The site file.
        overrides: ``key=value`` strings applied last.

    Raises:
        InputError: The file is missing or is not YAML.
        ConfigError: An unknown key, a wrong type or an unknown stage.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"site file {path} does not exist; write one (see README, 'Running a site')")
    try:
        user = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise InputError(f"site file {path} is not valid YAML: {exc}") from None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SiteConfig), user)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"site file {path}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    bad = [s for s in cfg.policy.stages if s not in known_stages()]
    if bad:
        raise ConfigError(f"site file {path}: policy.stages has unknown {bad}; known: {', '.join(known_stages())}")
    if cfg.batch_size < 1 or cfg.policy.max_local_steps < 0 or cfg.threads < 0:
        raise ConfigError(f"site file {path}: batch_size must be >= 1, threads and policy.max_local_steps >= 0")
    dp = cfg.policy.dp
    for key in ("epsilon_total", "epsilon_per_run"):
        if dp[key] is not None and not dp[key] > 0:
            raise ConfigError(f"site file {path}: policy.dp.{key} must be > 0 or null (no limit), got {dp[key]}")
    if not 0 < dp.delta < 1:
        raise ConfigError(f"site file {path}: policy.dp.delta must be in (0, 1), got {dp.delta}")
    if dp.unit not in UNITS:
        raise ConfigError(f"site file {path}: policy.dp.unit must be one of {', '.join(UNITS)} (patient: ε per "
                          f"patient, series: per series or image-report pair), got {dp.unit!r}")
    base = path.parent
    cfg.catalog = _absolute(base, cfg.catalog)
    cfg.extra_catalogs = [_absolute(base, c) for c in cfg.extra_catalogs]
    if cfg.public_catalog is not None:
        cfg.public_catalog = _absolute(base, cfg.public_catalog)
    if dp.ledger is not None:
        dp.ledger = _absolute(base, dp.ledger)
    for key in ("root_certificates", "node_key"):
        if cfg.server[key] is not None:
            cfg.server[key] = _absolute(base, cfg.server[key])
    cfg_any: Any = cfg
    return cfg_any


def _absolute(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
