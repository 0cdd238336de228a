"""`fedmri simulate`: a whole federation on one machine, with its baselines.

1. Synthesises hospitals (or takes given catalogs) and indexes them.
2. Runs Flower's Simulation Engine, one virtual SuperNode per site, each with
   its own ``site.yaml`` (found by the ClientApp through ``FEDMRI_SIM_SITES``,
   a file on this machine, never through the server). With ``device=cuda``
   every site trains on the machine's GPU, Ray reserving ``gpus_per_site`` of
   it per site, so several sites share one GPU.
3. Modes, each evaluated the same way (the evaluate stage on every real site's
   validation split, and on every series of the held-out hospitals):
   - ``federated``: the pipeline over all sites;
   - ``random``: the same heads tuning and evaluation on a randomly
     initialised encoder (the pretrain and align stages left out), so the
     worth of federated pretraining is measured, not assumed;
   - ``local``: every site alone with the same rounds and local steps, its
     model evaluated on every site; the row is the mean over those models;
   - ``central``: one pooled site holding every site's training split (each
     patient keeps the split its own site gave it), with the local steps of
     all sites together per round;
   - ``ceiling``: a MONAI 3D CNN trained from scratch *with* the findings
     labels on the pooled training splits (:mod:`fedmri.simulations.ceiling`),
     outside Flower: how well disease can be seen in these volumes at all.
4. Writes ``<run_root>/<name>/results.json`` and ``report.md`` (with the
   cross-site matrices) and prints one table.

The demo's federation (no ``federation.overrides`` given) tunes the lesion
heads ``segmentation`` and ``anomaly`` besides the MLP tasks, in every Flower
mode: their Dice and mIoU (with the series behind them) are compared like the
other heads' figures.

Held-out hospitals (``holdout_sites``, ``holdout_catalogs``) are outside the
federation: synthesised from their own seed, their site file allows the
evaluate stage only, and every one of their series is evaluation data. They
are reported apart from the federation's sites (``<mode> @ held-out``) and as
columns of the cross-site matrices.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmri import stages as stage_registry
from fedmri.config.loader import apply_overrides
from fedmri.errors import ConfigError, InputError
from fedmri.protocol import SIM_SITES_ENV
from fedmri.server.config import FederationConfig, check_federation, run_config

MODES = ("federated", "random", "local", "central", "ceiling")
# Modes that train through Flower; "ceiling" is a supervised network on the pooled training splits.
FLOWER_MODES = ("federated", "random", "local", "central")
POOLED = "pooled"
HOLDOUT = "holdout"
AT_HOLDOUT = " @ held-out"
# Where the virtual sites and the ceiling train; a CUDA run shares the machine's GPUs between the sites.
DEVICES = ("cpu", "cuda")
# Lesion heads the demo tunes besides the MLP tasks, in every Flower mode (fedmri.heads.dense).
DEMO_DENSE_TASKS = ("segmentation", "anomaly")


def _demo_heads() -> list[str]:
    """Run-config overrides of the demo's heads stage: the MLP tasks and the two dense ones.

    Set here, on the demo's federation, rather than in ``HeadsConfig.tasks``: a
    dense task caches patch tokens and layers and turns a CPU heads round of
    under a second into 10-60 s (:mod:`fedmri.client.trainers.heads_dense`), a
    cost a `fedmri run` federation should choose, while the demo is where every
    head's figure is compared across the modes. A simulation file that sets
    ``federation.overrides`` replaces these lines (the tests' small configs keep
    their MLP tasks so); add them to keep the dense heads.
    """
    from fedmri.config.schema import HeadsConfig

    tasks = [*HeadsConfig().tasks, *DEMO_DENSE_TASKS]
    # The light decoder at 1/4 of the image's resolution, 8 channels: one site's heads round
    # on the demo's ~32 training series takes ~5 s on a CPU core (UNETR: ~11 s at
    # seg_feature_size 4, ~50 s at its default 16), scoring the held-out hospital's 150
    # series ~9-13 s (UNETR at 4: ~10 s); the demo trains heads 20 site-rounds long and
    # scores that hospital 6 times (benchmarks/bench_demo_heads.py). It reads the image,
    # which tokens of 16^3 voxels cannot replace for lesions of a few voxels.
    return [f"heads.tasks=[{','.join(tasks)}]", "heads.seg_decoder=light", "heads.seg_stride=4",
            "heads.seg_feature_size=8"]


def _default_federation() -> FederationConfig:
    fed = FederationConfig()
    fed.name = "demo"
    fed.overrides = _demo_heads()
    return fed


@dataclass
class SimulationConfig:
    """What `fedmri simulate` runs."""

    # Synthetic hospitals to generate (ignored when catalogs are given).
    sites: int = 3
    # Synthesis preset: "demo" (small series) or "full" (clinical sizes).
    synth_preset: str = "demo"
    # DICOM series per synthetic hospital.
    series_per_site: int = 48
    # Where synthetic sites, catalogs and site files go; default <run_root>/<name>/data.
    data_dir: str | None = None
    # Existing catalog folders (from `fedmri data index`) to use instead of synthesising.
    catalogs: list[str] = field(default_factory=list)
    # Hospitals outside the federation, synthesised from a seed of their own:
    # they never train and all their series are evaluation data.
    holdout_sites: int = 1
    # Processes that synthesise and index hospitals at once (0: one per CPU core).
    synth_workers: int = 0
    # Series of each held-out hospital (null: series_per_site). 150 give ~40
    # patients, so a finding's AUROC there has an interval narrower than +-0.2.
    holdout_series: int | None = 150
    # Case mix of synthesised held-out hospitals: "balanced" (every region and
    # finding well represented, so each AUROC rests on enough cases) or "site"
    # (the archetype's own patients).
    holdout_case_mix: str = "balanced"
    # Existing catalogs to hold out instead (scored on the evaluate stage's split).
    holdout_catalogs: list[str] = field(default_factory=list)
    # Which of federated, random, local, central, ceiling to run (in that order).
    modes: list[str] = field(default_factory=lambda: list(MODES))
    # Per-site local batch size.
    batch_size: int = 4
    # torch threads per virtual site.
    threads_per_site: int = 1
    # CPUs Ray reserves per virtual site (2 cores and 1.0: two sites train at once).
    cpus_per_site: float = 1.0
    # Data-loading worker processes per virtual site (0: load in the site's own
    # process). On a GPU the crops are made on the CPU: workers keep it fed.
    workers_per_site: int = 0
    # Where every virtual site and the ceiling train: "cpu" or "cuda" (the
    # machine's GPUs, shared between the sites as gpus_per_site says).
    device: str = "cpu"
    # Fraction of a GPU Ray reserves per virtual site when device is cuda: 0.25
    # lets four sites train at once on one GPU (fewer if cpus_per_site runs out first).
    gpus_per_site: float = 0.25
    # Epochs of the supervised ceiling (mode "ceiling") over the pooled training series.
    ceiling_epochs: int = 70
    # key=value overrides onto every simulated site's site.yaml, e.g. ["policy.dp.unit=series"].
    site_overrides: list[str] = field(default_factory=list)
    federation: FederationConfig = field(default_factory=_default_federation)


def load_simulation(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults, then the file, then ``key=value`` overrides; checked.

    Raises:
        InputError: A missing or unreadable file.
        ConfigError: Unknown keys, wrong types, unknown modes, a bad federation.
    """
    where = str(path) if path else "simulation defaults"
    try:
        cfg = OmegaConf.structured(SimulationConfig)
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise InputError(f"simulation config {p} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        if overrides:
            apply_overrides(cfg, list(overrides), where)
    except (InputError, ConfigError):
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {getattr(exc, 'msg', exc)}") from None
    bad_modes = [m for m in cfg.modes if m not in MODES]
    if bad_modes or not cfg.modes:
        raise ConfigError(f"{where}: modes {list(cfg.modes)} must be a non-empty list of {', '.join(MODES)}")
    n = len(cfg.catalogs) or cfg.sites
    if n < 1:
        raise ConfigError(f"{where}: sites must be >= 1")
    if cfg.holdout_sites < 0:
        raise ConfigError(f"{where}: holdout_sites must be >= 0, got {cfg.holdout_sites}")
    if cfg.synth_workers < 0:
        raise ConfigError(f"{where}: synth_workers must be >= 0 (0: one per CPU core), got {cfg.synth_workers}")
    if cfg.holdout_case_mix not in ("site", "balanced"):
        raise ConfigError(f"{where}: holdout_case_mix must be 'site' or 'balanced', got {cfg.holdout_case_mix!r}")
    if cfg.holdout_series is not None and cfg.holdout_series < 1:
        raise ConfigError(f"{where}: holdout_series must be >= 1 (or null: series_per_site), got {cfg.holdout_series}")
    _check_device(cfg, where)
    if cfg.workers_per_site < 0:
        raise ConfigError(f"{where}: workers_per_site must be >= 0 (0: load in the site's process), "
                          f"got {cfg.workers_per_site}")
    if cfg.federation.min_sites > n:
        raise ConfigError(f"{where}: federation.min_sites={cfg.federation.min_sites} but only {n} sites")
    check_federation(cfg.federation, where)
    return cfg


def _check_device(cfg: DictConfig, where: str) -> None:
    """``device`` names a device this machine has and, on cuda, ``gpus_per_site`` a share of one GPU."""
    if cfg.device not in DEVICES:
        raise ConfigError(f"{where}: device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if cfg.device == "cuda":
        import torch

        if not 0.0 < cfg.gpus_per_site <= 1.0:
            raise ConfigError(f"{where}: gpus_per_site must be in (0, 1] (the share of one GPU each site "
                              f"reserves), got {cfg.gpus_per_site}")
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: device=cuda but torch sees no CUDA GPU on this machine; "
                              "set device=cpu, or run on a GPU machine with a CUDA build of torch")


@dataclass
class SimSite:
    name: str
    catalog: Path
    site_file: Path


def prepare_sites(sim: DictConfig, data_dir: Path,
                  say: Callable[[str], None] = print) -> tuple[list[SimSite], list[SimSite]]:
    """Synthesise and index the hospitals (or take the given catalogs); write a site.yaml each.

    Hospitals are synthesised and indexed in parallel, one process per CPU core
    (``synth_workers``): each is independent and single-threaded.

    Returns:
        The federation's sites and the held-out hospitals.
    """
    cfg = run_config(sim.federation)
    data_dir.mkdir(parents=True, exist_ok=True)
    seed = int(sim.federation.seed)
    jobs: list[dict[str, Any]] = []
    if not sim.catalogs:
        jobs += [dict(cfg=cfg, data_dir=data_dir, name=f"site-{i:02d}", index=i, seed=seed, preset=sim.synth_preset,
                      series=int(sim.series_per_site)) for i in range(1, sim.sites + 1)]
    if not sim.holdout_catalogs and not sim.catalogs:
        # Every series of a held-out hospital is evaluation data: the evaluate stage's split takes all patients.
        split = _evaluate_split(sim)
        held = copy.deepcopy(cfg)
        OmegaConf.set_readonly(held, False)
        held.data.catalog.split_fractions = [float(split == s) for s in ("train", "val", "test")]
        # The next archetypes (another vendor and protocol) from a seed of their own.
        series = int(sim.holdout_series or sim.series_per_site)
        jobs += [dict(cfg=held, data_dir=data_dir, name=f"{HOLDOUT}-{k:02d}", index=sim.sites + k,
                      seed=holdout_seed(seed, k), preset=sim.synth_preset, series=series,
                      case_mix=str(sim.holdout_case_mix)) for k in range(1, sim.holdout_sites + 1)]
    made = {site.name: site for site in _synthesise_all(jobs, int(sim.synth_workers), say)}
    if sim.catalogs:
        sites = [_given(catalog, f"site-{i:02d}", data_dir) for i, catalog in enumerate(sim.catalogs, start=1)]
    else:
        sites = [made[f"site-{i:02d}"] for i in range(1, sim.sites + 1)]
    if sim.holdout_catalogs:
        holdouts = [_given(c, f"{HOLDOUT}-{k:02d}", data_dir) for k, c in enumerate(sim.holdout_catalogs, start=1)]
    elif sim.catalogs:
        holdouts = []  # synthetic hospitals are not held out from real ones: name holdout_catalogs
    else:
        holdouts = [made[f"{HOLDOUT}-{k:02d}"] for k in range(1, sim.holdout_sites + 1)]
    for site in sites:
        write_site_file(sim, site.site_file, site.name, site.catalog)
    for site in holdouts:
        # A held-out hospital only scores models.
        write_site_file(sim, site.site_file, site.name, site.catalog,
                         stages=list(stage_registry.names(trains=False)))
    return sites, holdouts


def _synthesise_all(jobs: list[dict[str, Any]], workers: int, say: Callable[[str], None]) -> list[SimSite]:
    """Run :func:`synthesise_site` for each job, in ``workers`` processes (0: one per core).

    The largest hospitals start first (the held-out one: 150 series against 48 per
    site by default), so that none is left to run alone at the end while the
    other cores idle. The workers' lines (progress, then the summary) reach ``say``
    as they are written; the sites come back in job order.
    """
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) <= 1:
        return [synthesise_site(**job, say=say) for job in jobs]
    import multiprocessing as mp
    import queue
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no fork: the caller may hold threads or torch state
    workers = min(workers, len(jobs))
    say(f"[data] {len(jobs)} hospitals to synthesise and index, {workers} processes at a time ...")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        lines = manager.Queue()

        def relay() -> None:
            while True:
                try:
                    say(lines.get_nowait())
                except queue.Empty:
                    return

        # The pool starts jobs in the order they are submitted.
        futures = {k: pool.submit(_synthesise_job, jobs[k], lines) for k in largest_first(jobs)}
        pending = set(futures.values())
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            relay()
            if any(f.exception() is not None for f in done):
                break
        return [futures[k].result() for k in range(len(jobs))]  # the first failure raises here


def largest_first(jobs: list[dict[str, Any]]) -> list[int]:
    """Indices of ``jobs``, the most series first; equal ones in job order."""
    return sorted(range(len(jobs)), key=lambda k: -int(jobs[k]["series"]))


def _synthesise_job(job: dict[str, Any], lines: Any) -> SimSite:
    """One hospital in a worker process, on one thread; its lines go to the ``lines`` queue."""
    import torch

    torch.set_num_threads(1)
    return synthesise_site(**job, say=lines.put)


def _evaluate_split(sim: DictConfig) -> str:
    """The split the evaluation stage scores ("val" without one)."""
    return next((str(st.split) for st in sim.federation.stages if not _trains(st)), "val")


def _trains(stage: DictConfig) -> bool:
    return stage_registry.get(stage.name).trains


def holdout_seed(seed: int, k: int) -> int:
    """The seed of held-out hospital ``k``: none of the federation's sites derives from it."""
    return (seed + 7919 * k + 104729) % 2**31


def _given(catalog: str, name: str, data_dir: Path) -> SimSite:
    path = Path(catalog).expanduser().resolve()
    if not (path / "catalog.sqlite").is_file():
        raise InputError(f"catalog {path} has no catalog.sqlite; make it with `fedmri data index`")
    return SimSite(name, path, data_dir / f"{name}.yaml")


def synthesise_site(cfg: DictConfig, data_dir: Path, name: str, index: int, seed: int, say: Callable[[str], None],
                    preset: str, series: int, case_mix: str = "site", every_s: float = 30.0) -> SimSite:
    """Synthesise hospital ``name`` into ``<data_dir>/hospitals/<name>`` and index it into
    ``<data_dir>/catalogs/<name>`` with a seeded salt (complete folders are reused).

    ``say`` gets a line at the start, the count of series written every ``every_s``
    seconds, and a summary once the hospital is indexed.
    """
    import time

    from fedmri.data.indexer import index_site
    from fedmri.simulations.synth import generate_site

    root = data_dir / "hospitals" / name
    say(f"[data] {name}: synthesising {series} series ({preset}, seed {seed}) ...")
    started = last = time.monotonic()

    def progress(_: str, done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if 0 < done < total and now - last >= every_s:
            last = now
            say(f"[data] {name}: {done}/{total} series written, {now - started:.0f} s")

    generate_site(root, site_index=index, seed=seed, preset=preset, series_per_site=series, case_mix=case_mix,
                  progress=progress)
    catalog = data_dir / "catalogs" / name
    synthetic_salt(catalog, seed, name)
    result = index_site(root / "dicom", root / "reports.csv", catalog, labels=root / "labels.csv", cfg=cfg)
    say(f"[data] {name}: {result.n_series} series indexed ({result.n_loaded} read, "
        f"{len(result.skipped)} skipped) -> {catalog}")
    return SimSite(name, catalog.resolve(), data_dir / f"{name}.yaml")


def synthetic_salt(catalog: Path, seed: int, name: str) -> None:
    """Give a synthetic site's catalog a salt derived from the seed, unless it has one.

    A real site's salt is random and secret (it keys the patient pseudonyms).
    Synthetic hospitals hold no patients, and a seeded salt makes the same seed
    put the same patients in the same splits, so a simulation is repeatable.
    """
    import hashlib

    from fedmri.data.catalog_db import SALT_FILE

    path = catalog / SALT_FILE
    if path.exists():
        return
    catalog.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(hashlib.sha256(f"fedmri-synthetic-site:{seed}:{name}".encode()).hexdigest() + "\n")


def write_site_file(sim: DictConfig, path: Path, name: str, catalog: Path, extra: list[Path] | None = None,
                     stages: list[str] | None = None) -> None:
    """Write a simulated site's ``site.yaml``: its catalog and the simulation's device, threads and batch size.

    Args:
        sim: The simulation config.
        path: Where the site file goes.
        name: The site's name.
        catalog: Its catalog folder.
        extra: More catalogs it trains on (the pooled ``central`` baseline); it then keeps
            its own privacy ledger next to ``path``.
        stages: ``policy.stages``, when the site may run only these (a held-out hospital).
    """
    body: dict[str, Any] = {"name": name, "catalog": str(catalog), "device": str(sim.device),
                            "threads": int(sim.threads_per_site), "batch_size": int(sim.batch_size),
                            "num_workers": int(sim.workers_per_site)}
    if stages is not None:  # a held-out hospital declines to train, whatever it is sent
        body["policy"] = {"stages": stages}
    if extra:
        body["extra_catalogs"] = [str(p) for p in extra]
        # The pooled baseline is not site-01: it keeps its own privacy ledger.
        body["policy"] = {"dp": {"ledger": str(path.with_suffix(".privacy-ledger.sqlite"))}}
    site = OmegaConf.create(body)
    apply_overrides(site, list(sim.get("site_overrides") or []), "simulation site_overrides")
    path.write_text(OmegaConf.to_yaml(site), encoding="utf-8")


def run_engine(server_main: Callable[[Any], None], site_files: list[Path], sim: DictConfig, map_file: Path) -> None:
    """One Flower Simulation Engine session: one virtual SuperNode per site file.

    Args:
        server_main: Runs the coordinator's side with the engine's ``Grid``.
        site_files: One ``site.yaml`` per virtual SuperNode, partition ``i`` -> ``site_files[i]``.
        sim: The simulation config (client resources).
        map_file: Where the partition -> site file map is written (``FEDMRI_SIM_SITES``).

    Raises:
        Whatever ``server_main`` raised, after the engine has shut down.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedmri.client.app import app as client_app

    map_file.write_text(json.dumps({str(i): str(p) for i, p in enumerate(site_files)}), encoding="utf-8")
    os.environ[SIM_SITES_ENV] = str(map_file)  # Ray's workers inherit it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU tip on every start
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _quiet_flower_deprecation()
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        try:
            server_main(grid)
        except BaseException as exc:  # surfaced after the engine has shut down
            failure.append(exc)
            raise

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(site_files),
                   backend_config={"client_resources": client_resources(sim),
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}})
    if failure:
        raise failure[0]


def client_resources(sim: DictConfig) -> dict[str, float]:
    """What Ray reserves for each virtual site: as many train at once as the machine holds."""
    gpus = float(sim.gpus_per_site) if sim.device == "cuda" else 0.0
    return {"num_cpus": float(sim.cpus_per_site), "num_gpus": gpus}


class _DropDeprecation(logging.Filter):
    """fedmri drives the Simulation Engine through run_simulation on purpose (an
    in-process ServerApp bound to a config object); Flower's notice about it
    would only confuse a researcher."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "DEPRECATED FEATURE" not in text and "run_simulation" not in text


def _quiet_flower_deprecation() -> None:
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropDeprecation) for f in logger.filters):
        logger.addFilter(_DropDeprecation())


def _mode_fed(sim: DictConfig, mode: str, site: str | None = None) -> DictConfig:
    fed = OmegaConf.create(OmegaConf.to_container(sim.federation, resolve=True))
    fed = OmegaConf.merge(OmegaConf.structured(FederationConfig), fed)
    fed.name = f"{sim.federation.name}/{mode}" + (f"-{site}" if site else "")
    return fed


def simulate(sim: DictConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every mode of ``sim``.

    Returns:
        {row: evaluation metrics}: each mode on the federation's sites, then each
        mode on the held-out hospitals as ``"<mode> @ held-out"``. ``results.json``
        keeps them as ``modes`` and ``holdout``.
    """
    from fedmri.server.pipeline import Pipeline

    root = Path(sim.federation.run_root) / sim.federation.name
    root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(sim.data_dir) if sim.data_dir else root / "data"
    sites, holdouts = prepare_sites(sim, data_dir, say)
    names, held = [s.name for s in sites], [s.name for s in holdouts]
    n = len(sites)
    results: dict[str, Any] = {}
    if all(_trains(st) for st in sim.federation.stages):
        say("[simulate] note: no evaluate stage, so the modes are not compared")

    site_files = [s.site_file for s in sites + holdouts]
    if "central" in sim.modes:
        pooled_file = data_dir / f"{POOLED}.yaml"
        write_site_file(sim, pooled_file, POOLED, sites[0].catalog, [s.catalog for s in sites[1:]])
        site_files.append(pooled_file)

    def alone(fed: DictConfig, local_factor: int = 1) -> DictConfig:
        """One site trains (a site alone, the pooled site); every site and held-out hospital evaluates."""
        fed.min_sites = 1
        for st in fed.stages:
            if not _trains(st):
                st.min_sites = n + len(held)
            else:
                st.min_sites = 1
                st.local_steps = int(st.local_steps) * local_factor
        return fed

    def run_modes(grid: Any) -> None:
        # Every mode in one engine session: Ray starts once. The pooled
        # SuperNode of the central mode idles through the other modes.
        for mode in [m for m in sim.modes if m in FLOWER_MODES]:
            fed = _mode_fed(sim, mode)
            if mode == "random":
                # The encoder stays as initialised: only stages that do not build it run.
                fed.stages = [st for st in fed.stages if not stage_registry.get(st.name).builds_encoder]
            say(f"[simulate] mode {mode}: {n} sites" + (f" + {len(held)} held out" if held else "") + ", stages "
                + (" -> ".join(f"{st.name} x{st.rounds}" for st in fed.stages) or "none"))
            if mode in ("federated", "random"):
                results[mode] = Pipeline(fed, train_sites=names, eval_sites=names + held).run_all(grid)
            elif mode == "local":
                per_site: dict[str, Any] = {}
                for name in names:
                    say(f"[simulate] local: {name} trains alone")
                    per_site[name] = Pipeline(alone(_mode_fed(sim, mode, name)), train_sites=[name],
                                              eval_sites=names + held).run_all(grid)
                results["local"] = {"per_model": per_site}
            elif mode == "central":  # with the local steps of all sites together per round
                results["central"] = Pipeline(alone(fed, local_factor=n), train_sites=[POOLED],
                                              eval_sites=names + held).run_all(grid)

    if any(m in FLOWER_MODES for m in sim.modes):
        run_engine(run_modes, site_files, sim, root / "sites.json")
    modes = {m: _evaluation(r, names) for m, r in results.items()}
    holdout = {m: _evaluation(r, held) for m, r in results.items()} if held else {}
    ceiling_scores = None
    if "ceiling" in sim.modes:
        modes["ceiling"], holdout_ceiling, ceiling_scores = _ceiling(sim, sites, holdouts, root / "ceiling", say)
        if held:
            holdout["ceiling"] = holdout_ceiling
    differences = _holdout_differences(sim, root, names, holdouts, ceiling_scores, say) if held else {}
    from fedmri.machine import machine_record

    (root / "results.json").write_text(json.dumps({"modes": modes, "holdout": holdout, "sites": names,
                                                   "holdout_sites": held, "holdout_differences": differences,
                                                   "runs": results, "machine": machine_record()},
                                                  indent=1, sort_keys=True), encoding="utf-8")
    from fedmri.simulations.report import write_report

    report = write_report(root)
    say(f"report: {report}")
    _track_report(root, report)
    return modes | {m + AT_HOLDOUT: v for m, v in holdout.items()}


def _track_report(root: Path, report: Path) -> None:
    """The simulation's report.md (the held-out and cross-site tables) into each mode's trackers.

    TensorBoard: a text summary ``report`` in the mode's ``tensorboard/all`` at its last round;
    MLflow: an artifact of the mode's MLflow run (``mlflow.json`` in its folder).
    """
    from torch.utils.tensorboard import SummaryWriter

    from fedmri.server.rundir import RunDir
    from fedmri.server.tracking import FOLDER, mlflow_client

    text = report.read_text(encoding="utf-8")
    for events in sorted(root.glob(f"*/{FOLDER}/all")):
        last_round = int(RunDir(events.parent.parent).read_state().get("server_round") or 0)
        with SummaryWriter(str(events)) as writer:
            writer.add_text("report", text, last_round)
    for record in sorted(root.glob("*/mlflow.json")):
        entry = json.loads(record.read_text(encoding="utf-8"))
        mlflow_client(entry["uri"]).log_artifact(entry["run_id"], str(report))


def _ceiling(sim: DictConfig, sites: list[SimSite], holdouts: list[SimSite], folder: Path,
             say: Callable[[str], None]) -> tuple[dict[str, float], dict[str, float], tuple[list[str], Any] | None]:
    """The supervised ceiling's findings metrics on the sites' validation splits and on the held-out hospitals.

    Keys are those of the heads' evaluation (``findings_auroc_in_region_macro``
    with ``_ci_low``/``_ci_high``, ``findings_auroc_in_region/<code>``), so the
    ceiling is a row of the same tables. Writes ``<folder>/results.json``.
    Also returns the held-out series' names and scores (for the paired
    differences), or None.
    """
    from fedmri.metrics.bootstrap import CI_HIGH, CI_LOW
    from fedmri.simulations.ceiling import CeilingConfig, findings_intervals, load_split, predict, train_ceiling

    cfg = CeilingConfig(epochs=int(sim.ceiling_epochs), seed=int(sim.federation.seed), device=str(sim.device))
    train = load_split([s.catalog for s in sites], "train")
    say(f"[simulate] mode ceiling: {cfg.network} trained with the findings labels on the {len(train)} pooled "
        f"training series, {cfg.epochs} epochs, on {cfg.device}")
    model, losses = train_ceiling(train, cfg, say=say, say_every=10)  # 70 epochs by default: show it moving
    out: list[dict[str, float]] = []
    held_scores = None
    # The series the evaluate stage scores: the sites' split, and all of a synthesised held-out hospital
    # (its catalog puts every series in that split; a given held-out catalog is scored on the split too).
    for catalogs in ([s.catalog for s in sites], [h.catalog for h in holdouts]):
        row: dict[str, float] = {}
        if catalogs:
            try:
                scored = load_split(catalogs, _evaluate_split(sim))
            except InputError:  # no labelled series there
                scored = None
            if scored is not None:
                probabilities = predict(model, scored)
                held_scores = (scored.series, probabilities)  # the last pass: the held-out hospitals
                overall, by_sequence = findings_intervals(probabilities, scored, cfg.n_boot, cfg.seed)
                row["num-examples"] = float(len(scored))
                for code, iv in overall.items():
                    key = _in_region_key(code)
                    # The ceiling holds every series' score, so pooled sites get an interval too.
                    row[key], row[key + CI_LOW], row[key + CI_HIGH] = iv.value, iv.low, iv.high
                for code, families in by_sequence.items():  # as the heads' evaluation names them
                    row |= {f"{_in_region_key(code)}@{family}": iv.value for family, iv in families.items()}
        out.append(row)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"network": cfg.network, "epochs": cfg.epochs,
                                                     "n_train": len(train), "losses": losses, "sites": out[0],
                                                     "holdout": out[1]}, indent=1), encoding="utf-8")
    return out[0], out[1], held_scores if holdouts else None


def _in_region_key(code: str) -> str:
    """The heads' evaluation's name for a finding's (or the macro) in-region AUROC."""
    return "findings_auroc_in_region_macro" if code == "macro" else f"findings_auroc_in_region/{code}"


def _holdout_differences(sim: DictConfig, root: Path, names: list[str], holdouts: list[SimSite],
                         ceiling_scores: tuple[list[str], Any] | None,
                         say: Callable[[str], None]) -> dict[str, Any]:
    """Paired ``federated - <mode>`` differences on each held-out hospital (:mod:`fedmri.simulations.compare`)."""
    from fedmri.simulations.compare import BASELINE, Hospital, ceiling_outputs, compare_modes, verdict

    if BASELINE not in sim.modes:
        return {}
    exports: dict[str, list[Path]] = {}
    for mode in [m for m in sim.modes if m in FLOWER_MODES]:
        runs = [f"{mode}-{name}" for name in names] if mode == "local" else [mode]
        exports[mode] = [root / run / "encoder" for run in runs if (root / run / "encoder").is_dir()]
    out = {}
    for hospital_site in holdouts:
        try:
            hospital = Hospital.load(hospital_site.catalog, _evaluate_split(sim), hospital_site.name)
        except InputError:
            continue
        if not len(hospital.dataset):
            continue
        extra = {}
        if ceiling_scores is not None:
            outputs = ceiling_outputs(hospital, *ceiling_scores)
            if outputs is not None:
                extra["ceiling"] = outputs
        say(f"[simulate] {hospital.name}: paired differences federated - other modes over its "
            f"{len(set(hospital.patients))} patients")
        # 500 resamples, as the sites' own intervals (fedmri.heads.intervals).
        out[hospital.name] = found = compare_modes(hospital, exports, extra, n_boot=500,
                                                   seed=int(sim.federation.seed))
        for metric, by_mode in found["differences"].items():
            for mode, d in by_mode.items():
                say(f"[simulate]   {metric}: federated - {mode} {d['value']:+.3f} "
                    f"[{d['low']:+.3f}, {d['high']:+.3f}], {verdict(d)}")
    return out


def _evaluation(result: dict[str, Any], sites: list[str]) -> dict[str, float]:
    """The final evaluation of ``sites``, weighted by their series as the coordinator weighs them.

    A run's own aggregate mixes the federation's sites with the held-out ones;
    this keeps them apart. A ``local`` result is the mean over its per-site models.
    """
    from fedmri.metrics import aggregate_metrics

    if "per_model" in result:
        evals = [_without_intervals(_evaluation(r, sites)) for r in result["per_model"].values()]
        keys = sorted({k for e in evals for k in e})
        return {k: sum(e[k] for e in evals if k in e) / sum(1 for e in evals if k in e) for k in keys}
    rows = [m for site, m in result.get("per_site", {}).items() if site in sites]
    if len(rows) > 1:
        rows = [_without_intervals(r) for r in rows]
    return aggregate_metrics(rows) if rows else {}


def _without_intervals(metrics: dict[str, float]) -> dict[str, float]:
    """A site's metrics less its interval bounds: they bound that site's figure, not a mean over sites or models."""
    from fedmri.metrics.bootstrap import CI_HIGH, CI_LOW

    return {k: v for k, v in metrics.items() if not k.endswith((CI_LOW, CI_HIGH))}
