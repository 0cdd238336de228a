"""Where a federated round's time goes, what it sends, and how the simulation grows with sites.

Three parts, each a table; figures only, never asserted (docs/architecture.md, "Benchmarks"):

1. ``overhead``: pretrain and align rounds of 3 synthetic sites for the tiny
   and small presets, run through Flower's Simulation Engine (Ray, one
   virtual SuperNode per site) and, as the baseline, through the in-process
   ``LocalGrid`` of the pipeline tests (the real ClientApp called directly,
   no Ray), in the same run. Both engines run the sites one after another
   with every core (Ray: one actor holding all CPUs; ``--threads 1`` for one
   thread), so a round's wall time is the sites' handler times (the
   ClientApp's ``wall-time-s``) plus what federating them costs:
   ``overhead = wall - sum of site compute``, with wall timed around the
   grid's ``send_and_receive``. The pipeline's own
   ``overhead-s`` (wall - slowest site) assumes sites run in parallel, which a
   2-core simulation cannot do; it is printed too. The server's work outside
   ``send_and_receive`` (validation, aggregation, the rest of the round, the
   checkpoint) is timed by wrapping the Pipeline's methods.
2. ``bytes``: bytes each site receives and sends per round per stage, from
   the wire groups of every preset (float32, computed, no training), checked
   against the bytes the tiny runs of part 1 recorded; plus the size and
   write time of one checkpoint of the whole state.
3. ``scale``: 3, 20 and 50 simulated sites of a micro model (1 local step;
   site files reuse 3 indexed catalogs under distinct names) with
   ``fedmri simulate``'s defaults (one CPU and one thread per site: two
   sites train at once here): wall time per round, per site and round, and
   the peak memory of the whole process tree (driver, Ray's daemons and
   workers), each against the 3-site run.

Every engine session runs in a fresh process; a thread samples the RSS and
PSS (shared pages counted once) of that process and all its descendants, and
afterwards every process seen is checked to be gone (Ray's included).

    .venv/bin/python benchmarks/bench_federation.py            # 10-15 min on 2 cores
    .venv/bin/python benchmarks/bench_federation.py --quick    # 2-3 min
    .venv/bin/python benchmarks/bench_federation.py --data /tmp/fedbench --out /tmp/fedbench.json

Data and run folders go to a temporary folder (or ``--data``, kept for reuse);
nothing is written into the repository unless ``--out`` names a file there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

try:
    import psutil
except ModuleNotFoundError:  # not a project dependency: Ray (flwr[simulation]) vendors it and puts it on sys.path
    import ray  # noqa: F401
    import psutil

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers
from _harness import run_in_process

STAGES = ("pretrain", "align")
MB = 1e6


# --------------------------------------------------------------------------- data
def prepare_catalogs(data: Path, presets: list[str], series: int) -> dict[str, list[tuple[str, Path]]]:
    """Three synthetic hospitals (tiny DICOM), indexed once per preset: {preset: [(name, catalog)]}."""
    from fedmri.config import load_config
    from fedmri.data.indexer import index_site
    from fedmri.simulations.synth import generate_site

    out: dict[str, list[tuple[str, Path]]] = {}
    for i in (1, 2, 3):
        name = f"site-{i:02d}"
        hospital = data / "hospitals" / name
        t0 = time.perf_counter()
        info = generate_site(hospital, site_index=i, seed=0, preset="tiny", series_per_site=series)
        print(f"[data] {name}: {series} series {'reused' if info.reused else 'generated'} "
              f"in {time.perf_counter() - t0:.1f} s")
        for preset in presets:
            catalog = data / "catalogs" / preset / name
            t0 = time.perf_counter()
            # Indexed with the preset's own config, so volumes match its input size.
            index_site(hospital / "dicom", hospital / "reports.csv", catalog, labels=hospital / "labels.csv",
                       cfg=load_config(preset))
            print(f"[data] {name}: indexed for {preset} in {time.perf_counter() - t0:.1f} s")
            out.setdefault(preset, []).append((name, catalog.resolve()))
    return out


def write_site_files(folder: Path, catalogs: list[tuple[str, Path]], n: int, threads: int,
                     batch_size: int) -> list[Path]:
    """``n`` site files reusing ``catalogs`` cyclically, each under its own name (site-01 ... site-n)."""
    from fedmri.simulations.runner import write_site_file, load_simulation

    sim = load_simulation(overrides=[f"threads_per_site={threads}", f"batch_size={batch_size}"])
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"site-{i + 1:02d}.yaml"
        write_site_file(sim, path, f"site-{i + 1:02d}", catalogs[i % len(catalogs)][1])
        files.append(path)
    return files


# ------------------------------------------------------------------ one session
class _TimedGrid:
    """A grid that adds to ``sink`` the time of each exchange: ``send_and_receive`` (the identity
    queries) or, for the pipeline's rounds, from ``push_messages`` to the pull that brings the last reply."""

    def __init__(self, grid: Any, sink: Any) -> None:
        self.grid, self.sink = grid, sink
        self._pushed: tuple[float, set[str]] | None = None

    def get_node_ids(self) -> Any:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        t = time.perf_counter()
        ids = list(self.grid.push_messages(messages))
        self._pushed = (t, {i for i in ids if i})
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self.grid.pull_messages(message_ids))
        if self._pushed is not None:
            started, pending = self._pushed
            pending.difference_update(r.metadata.reply_to_message_id for r in replies)
            if not pending:
                self.sink()["send"] += time.perf_counter() - started
                self._pushed = None
        return replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        key = "query" if all(m.metadata.message_type == "query" for m in messages) else "send"
        t = time.perf_counter()
        try:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        finally:
            self.sink()[key] += time.perf_counter() - t


class RoundTimer:
    """Times the coordinator's rounds through the pipeline's public hooks: a grid wrapper and on_round_end.

    ``timings[server_round]``: ``send`` and ``query`` (the grid, per round) and the pipeline's own
    ``validate``, ``aggregate``, ``round`` and ``checkpoint`` (RoundOutcome.timings).
    """

    def __init__(self) -> None:
        self.timings: dict[int, dict[str, float]] = {}
        self.first_round_at: float | None = None
        self.last_round_end: float | None = None
        self._now: dict[str, float] = defaultdict(float)

    def grid(self, grid: Any) -> Any:
        def sink() -> dict[str, float]:
            if self.first_round_at is None:
                self.first_round_at = time.perf_counter()
            return self._now
        return _TimedGrid(grid, sink)

    def on_round_end(self, outcome: Any) -> None:
        self.timings[outcome.server_round] = dict(self._now) | outcome.timings
        self._now = defaultdict(float)
        self.last_round_end = time.perf_counter()


def _session(spec: dict[str, Any], queue: Any) -> None:
    """Run one federation (spec) on one engine in this fresh process; put its rows and timings on ``queue``."""
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Ray's sockets and logs in a folder of this session's own, not /tmp/ray: removed afterwards, and
    # no chance of joining another Ray instance on the machine.
    os.environ["RAY_TMPDIR"] = spec["ray_tmp"]
    from flwr.common.logger import log  # noqa: F401 -- sets the flwr logger up (at DEBUG) on import
    from omegaconf import OmegaConf

    from fedmri.server.config import load_federation
    from fedmri.server.pipeline import Pipeline

    logging.getLogger("flwr").setLevel(logging.WARNING)  # a few INFO lines per round and site otherwise
    fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(spec["federation"])))
    timer = RoundTimer()
    pipeline = Pipeline(fed, on_round_end=timer.on_round_end)
    files = [Path(p) for p in spec["site_files"]]
    t0 = time.perf_counter()
    if spec["engine"] == "local":
        from helpers.identity import server_identity
        from helpers.local_grid import LocalGrid

        # What Flower's ServerApp runtime sets before a ServerApp builds messages.
        with server_identity():
            pipeline.run_all(timer.grid(LocalGrid({i + 1: p for i, p in enumerate(files)})))
    else:
        from fedmri.simulations.runner import run_engine, load_simulation

        sim = load_simulation(overrides=[f"cpus_per_site={spec['cpus_per_site']}", f"sites={len(files)}"])
        run_engine(lambda grid: pipeline.run_all(timer.grid(grid)), files, sim, Path(spec["federation"]["run_root"]) / f"{fed.name}-sites.json")
    end = time.perf_counter()
    first = timer.timings[min(timer.timings)]
    queue.put({"rows": pipeline.run.read_metrics(), "server": timer.timings,
               # The sites' identity query runs inside the first round; it belongs to the start.
               "startup_s": timer.first_round_at - t0 + first.get("query", 0.0),
               "teardown_s": end - timer.last_round_end, "total_s": end - t0})


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants; remembers every process seen.

    RSS (``/proc/PID/statm``, cheap) every ``every`` seconds; PSS (``smaps_rollup``, which walks the page
    tables: ~40 ms for a Ray session's processes) every ``pss_every``-th sample, to keep sampling at a
    few percent of one core.
    """

    def __init__(self, pid: int, every: float = 0.5, pss_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every, self.pss_every = every, pss_every
        self.stop = threading.Event()
        self.seen: dict[int, psutil.Process] = {}
        self.peak_rss = self.peak_pss = 0
        self.peak_driver_rss = 0  # the session process alone: the coordinator (ServerApp and SuperLink state)
        self.max_procs = 0
        self.cpu_s = 0.0  # this thread's own CPU time: what sampling takes from the 2 cores
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, user + system CPU s at its last sample)

    def run(self) -> None:
        start, tick = time.thread_time(), 0
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            full, tick = tick % self.pss_every == 0, tick + 1
            rss = pss = 0
            for p in procs:
                self.seen.setdefault(p.pid, p)  # the Process object keeps the create time: no pid-reuse mix-up
                try:
                    mem = p.memory_full_info() if full else p.memory_info()
                    times = p.cpu_times()
                    self.cpu[p.pid] = (self._role(p), times.user + times.system)
                except psutil.Error:
                    continue
                rss, pss = rss + mem.rss, pss + (mem.pss if full else 0)
                if p.pid == self.root.pid:
                    self.peak_driver_rss = max(self.peak_driver_rss, mem.rss)
            self.peak_rss = max(self.peak_rss, rss)
            if full:
                self.peak_pss = max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, len(procs))
            self.cpu_s = time.thread_time() - start
            self.stop.wait(self.every)

    def _role(self, p: psutil.Process) -> str:
        if p.pid == self.root.pid:
            return "driver"
        title = " ".join(p.cmdline())
        # Ray titles its worker processes "ray::<actor or task>", idle ones "ray::IDLE"; its agents too.
        return "workers" if title.startswith(("ray::ClientAppActor", "ray::IDLE")) else "ray daemons"

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for role, seconds in self.cpu.values():
            out[role] += seconds
        return dict(out)


def leftover(seen: dict[int, psutil.Process], driver: int, grace_s: float = 20.0) -> list[str]:
    """Processes of a session still running ``grace_s`` after it ended (then ended here, by pid).

    Those seen in its process tree, and any process naming the session's Ray folder
    (``/tmp/ray/session_<date>_<time>_<n>_<driver pid>``), in case one came and left the tree between samples.
    """
    ray_session = re.compile(rf"session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver}\b")
    deadline = time.monotonic() + grace_s
    while True:
        alive = {}
        for p in [*seen.values(), *psutil.process_iter()]:
            try:
                if p.pid in alive or not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.pid in seen or ray_session.search(" ".join(p.cmdline())):
                    alive[p.pid] = p
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    alive = list(alive.values())
    names = []
    for p in alive:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.terminate()
        except psutil.Error:
            pass
    return names


def run_session(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh process while sampling its process tree; check that all of it has ended."""
    # Short: Ray's socket paths under it must stay within the 107 characters of a Unix socket name.
    spec = spec | {"ray_tmp": tempfile.mkdtemp(prefix="fbr-")}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    samplers: list[TreeSampler] = []

    def watch(pid: int) -> None:
        samplers.append(TreeSampler(pid))
        samplers[0].start()

    try:
        result = run_in_process(_session, spec, what=f"{spec['label']}: session", on_start=watch)
    finally:
        sampler = samplers[0]
        sampler.stop.set()
        sampler.join()
        left = leftover(sampler.seen, sampler.root.pid)
        shutil.rmtree(spec["ray_tmp"], ignore_errors=True)
    result |= {"label": spec["label"], "process_s": time.perf_counter() - start, "peak_rss": sampler.peak_rss,
               "peak_driver_rss": sampler.peak_driver_rss, "peak_pss": sampler.peak_pss, "max_procs": sampler.max_procs, "procs_seen": len(sampler.seen),
               "sampler_cpu_s": sampler.cpu_s, "load": (load_before, os.getloadavg()[0]),
               "cpu": sampler.cpu_by_role(), "leftover": left}
    print(f"[run] {spec['label']}: {result['total_s']:.1f} s in the engine, {result['process_s']:.1f} s with "
          f"process start; {len(sampler.seen)} processes, {len(result['leftover'])} left over; load average "
          f"{result['load'][0]:.1f} -> {result['load'][1]:.1f}; peak RSS MB: coordinator "
          f"{result['peak_driver_rss'] / MB:.0f}, tree {result['peak_rss'] / MB:.0f}", flush=True)
    return result


def federation_spec(name: str, run_root: Path, preset: str, overrides: list[str], rounds: int,
                    steps: dict[str, int], n_sites: int, stages: list[str] | tuple[str, ...] = STAGES,
                    strategy: dict[str, Any] | None = None, secure: bool = False) -> dict[str, Any]:
    extra = ({"strategy": strategy} if strategy else {}) | (
        {"secure_aggregation": {"enabled": True}} if secure else {})
    return {"name": name, "preset": preset, "overrides": overrides, "run_root": str(run_root), "export": False,
            # Every site in every round (no sampling); the run waits until all have registered
            # (200 Ray-simulated sites take a while to register).
            "min_sites": n_sites, "wait_for_sites_s": 600,
            # 200 small sites on 2 cores take about half an hour per round.
            "round_timeout_s": 7200,
            "stages": [{"name": s, "rounds": rounds, "local_steps": steps[s]} | extra for s in stages]}


# --------------------------------------------------------------- analysis
def per_round(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per global round: stage, wall, site compute, server-side timings, bytes."""
    rows = result["rows"]
    out = []
    for agg in (r for r in rows if r["site"] == "all"):
        sites = [r for r in rows if r["server_round"] == agg["server_round"] and r["status"] == "ok"]
        compute = [r["wall-time-s"] for r in sites]
        t = result["server"][agg["server_round"]]
        # From pushing the round's train messages to the last reply, timed around the grid; a round
        # that ran into round_timeout_s never saw its last reply: the pipeline's own wall, then.
        wall = t.get("send", agg["wall-time-s"])
        out.append({
            "stage": agg["stage"], "round": agg["round"], "sites": len(sites), "wall": wall,
            "sum_compute": sum(compute), "max_compute": max(compute, default=0.0),
            "overhead": wall - sum(compute), "pipeline_overhead": agg["overhead-s"],
            "validate": t.get("validate", 0.0), "aggregate": t.get("aggregate", 0.0),
            # Building the messages, the teacher EMA, the metrics rows: the rest of run_round.
            "other": t["round"] - wall - t.get("query", 0.0) - t.get("validate", 0.0) - t.get("aggregate", 0.0),
            "checkpoint": t.get("checkpoint", 0.0),
            "bytes_down": [r["bytes-down"] for r in sites], "bytes_up": [r["bytes-up"] for r in sites],
            "bytes_received": [r["bytes-received"] for r in sites], "bytes_sent": [r["bytes-sent"] for r in sites],
        })
    return out


def stage_medians(result: dict[str, Any], stage: str) -> dict[str, float]:
    rounds = [r for r in per_round(result) if r["stage"] == stage]
    keys = ("wall", "sum_compute", "max_compute", "overhead", "pipeline_overhead", "validate", "aggregate",
            "other", "checkpoint")
    med: dict[str, float] = {k: statistics.median(r[k] for r in rounds) for k in keys}
    med |= {"ratio": statistics.median(r["overhead"] / r["wall"] for r in rounds), "rounds": len(rounds),
            "sites": rounds[0]["sites"], "first_wall": rounds[0]["wall"], "first_overhead": rounds[0]["overhead"]}
    med["server"] = med["validate"] + med["aggregate"] + med["other"] + med["checkpoint"]
    return med


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


# -------------------------------------------------------------------- parts
def part_overhead(args: argparse.Namespace, catalogs: dict[str, list[tuple[str, Path]]], work: Path,
                  cpus: int, threads: int) -> dict[str, dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for preset in args.presets:
        steps = args.steps[preset]
        files = write_site_files(work / "sites" / f"{preset}-3", catalogs[preset], 3, threads=threads,
                                 batch_size=args.batch)
        results[preset] = {}
        for engine in ("local", "ray"):
            spec = {"label": f"{preset} {engine}", "engine": engine, "cpus_per_site": float(cpus),
                    "site_files": [str(f) for f in files],
                    "federation": federation_spec(f"overhead-{preset}-{engine}", work / "runs", preset, [],
                                                  args.rounds[preset], {s: steps for s in STAGES}, 3)}
            results[preset][engine] = run_session(spec)

    header = ["preset", "stage", "engine", "steps", "rounds", "wall s", "Σ sites s", "slowest s", "overhead s",
              "ovh/wall", "ovh/site s", "1st-round ovh s", "wall-slowest s", "validate s", "aggregate s",
              "other s", "ckpt s"]
    rows = []
    for preset, by_engine in results.items():
        for stage in STAGES:
            meds = {}
            for engine, result in by_engine.items():
                m = meds[engine] = stage_medians(result, stage)
                rows.append([preset, stage, engine, str(args.steps[preset]), str(m["rounds"]), f"{m['wall']:.2f}",
                             f"{m['sum_compute']:.2f}", f"{m['max_compute']:.2f}", f"{m['overhead']:.3f}",
                             f"{m['ratio']:.3f}", f"{m['overhead'] / m['sites']:.3f}", f"{m['first_overhead']:.2f}",
                             f"{m['pipeline_overhead']:.2f}", f"{m['validate']:.3f}", f"{m['aggregate']:.3f}",
                             f"{m['other']:.3f}", f"{m['checkpoint']:.3f}"])
            on_ray, local = meds["ray"], meds["local"]
            rows.append([preset, stage, "ray/local", "", "", ratio(on_ray["wall"], local["wall"]),
                         ratio(on_ray["sum_compute"], local["sum_compute"]),
                         ratio(on_ray["max_compute"], local["max_compute"]),
                         ratio(on_ray["overhead"], local["overhead"]), "", "", "", "", "", "", "", ""])
    table(f"1. Round time, 3 sites run one at a time with {threads} threads each (Ray: 1 actor of {cpus} CPUs; "
          "medians over rounds; overhead = "
          "wall - Σ sites; wall-slowest = the pipeline's overhead-s; validate..ckpt: server, outside "
          "send_and_receive)", header, rows)

    header = ["preset", "engine", "startup s", "teardown s", "session s", "process s", "peak RSS MB",
              "peak PSS MB", "processes", "left over", "CPU s driver/workers/daemons", "sampler CPU s",
              "load avg"]
    rows = []
    for preset, by_engine in results.items():
        for engine, r in by_engine.items():
            cpu = "/".join(f"{r['cpu'].get(k, 0.0):.0f}" for k in ("driver", "workers", "ray daemons"))
            rows.append([preset, engine, f"{r['startup_s']:.1f}", f"{r['teardown_s']:.1f}", f"{r['total_s']:.1f}",
                         f"{r['process_s']:.1f}", f"{r['peak_rss'] / MB:.0f}", f"{r['peak_pss'] / MB:.0f}",
                         str(r["procs_seen"]), str(len(r["leftover"])), cpu, f"{r['sampler_cpu_s']:.1f}",
                         f"{r['load'][0]:.1f}->{r['load'][1]:.1f}"])
    table("   Per session: startup = engine start to the first training message (Ray init, actor pool, the "
          "sites' identity query); teardown = last checkpoint to return (results, plots, Ray shutdown); "
          "process = with interpreter start and imports", header, rows)
    return results


def part_bytes(args: argparse.Namespace, overhead: dict[str, dict[str, dict[str, Any]]], work: Path) -> dict:
    from fedmri import wire
    from fedmri.config import load_config
    from fedmri.server.checkpoint import save_checkpoint

    measured: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for result in overhead.get("tiny", {}).values():
        for r in per_round(result):
            for key in ("bytes_down", "bytes_up", "bytes_received", "bytes_sent"):
                measured[r["stage"]][key] += r[key]

    out: dict[str, Any] = {}
    rows = []
    for preset in args.byte_presets:
        cfg = load_config(preset, overrides=["seed=0"])
        state = wire.initial_state(cfg)
        total = sum(v.numel() for v in state.values())
        times = []
        folder = work / "ckpt-bench" / preset
        for i in range(args.ckpt_repeats):
            t0 = time.perf_counter()
            save_checkpoint(folder, i + 1, state, {}, {"stage_index": 0, "round": i + 1})
            times.append(time.perf_counter() - t0)
        ckpt_bytes = (folder / f"round-{args.ckpt_repeats:04d}" / "global.safetensors").stat().st_size
        shutil.rmtree(work / "ckpt-bench", ignore_errors=True)
        out[preset] = {"params": total, "ckpt_bytes": ckpt_bytes, "ckpt_save_s": statistics.median(times),
                       "stages": {}}
        for stage in (*STAGES, "evaluate"):
            groups = wire.stage_groups(stage, cfg)
            down = sum(v.numel() * 4 for v in wire.select(state, groups.down).values())  # float32 on the wire
            up = sum(v.numel() * 4 for v in wire.select(state, groups.up).values())
            out[preset]["stages"][stage] = {"down": down, "up": up, "down_groups": list(groups.down),
                                            "up_groups": list(groups.up)}
            m = measured.get(stage)
            check = "-"
            if preset == "tiny" and m:
                med = {k: statistics.median(v) for k, v in m.items()}
                out[preset]["stages"][stage]["measured"] = med
                check = (f"{ratio(med['bytes_down'], down)} / {ratio(med['bytes_up'], up)} ; "
                         f"{ratio(med['bytes_received'], down)} / {ratio(med['bytes_sent'], up)}")
            rows.append([preset, f"{total / 1e6:.2f}M", stage, "+".join(groups.down), f"{down / MB:.2f}",
                         "+".join(groups.up) or "-", f"{up / MB:.2f}", f"{(down + up) / MB:.2f}",
                         f"{ckpt_bytes / MB:.1f}", f"{statistics.median(times):.3f}", check])
        del state
    table("2. Bytes per site per round (float32 wire groups from initial_state + stage_groups; MB = 1e6 B). "
          "check = measured / computed in part 1's tiny runs: pipeline bytes-down / bytes-up ; the site's "
          "bytes-received / bytes-sent. ckpt = whole global state, median of writes",
          ["preset", "state", "stage", "down groups", "MB down", "up groups", "MB up", "MB/site/round", "ckpt MB",
           "ckpt save s", "check"], rows)
    return out


def part_scale(args: argparse.Namespace, catalogs: dict[str, list[tuple[str, Path]]], work: Path) -> dict:
    results = {}
    preset, stages = args.scale_preset, args.scale_stages
    for n in args.sites:
        files = write_site_files(work / "sites" / f"{preset}-{n}", catalogs[_catalog_preset(preset)], n, threads=1,
                                 batch_size=args.batch)
        spec = {"label": f"{preset} {n} sites", "engine": "ray", "cpus_per_site": 1.0,
                "site_files": [str(f) for f in files],
                # micro (tiny shrunk to a 2-block, 32-wide encoder) keeps a round of many sites cheap;
                # small shows the coordinator's memory with updates of real size (131 MB each).
                "federation": federation_spec(f"scale-{n}", work / "runs", preset, args.scale_overrides, args.scale_rounds,
                                              {s: 1 for s in stages}, n, stages=stages,
                                              strategy={"name": args.scale_strategy}, secure=args.scale_secagg)}
        results[n] = run_session(spec)

    def summary(n: int) -> dict[str, float]:
        med = {s: stage_medians(results[n], s) for s in stages}
        mean = {k: sum(med[s][k] for s in stages) / len(stages) for k in ("wall", "sum_compute", "server")}
        return {s: med[s]["wall"] for s in stages} | {
            **mean, "per_site": mean["wall"] / n, "compute_per_site": mean["sum_compute"] / n}

    base_n = args.sites[0]
    base, base_r = summary(base_n), results[base_n]
    rows = []
    for n, r in results.items():
        m = summary(n)
        rows.append([str(n), *(f"{m[s]:.2f}" for s in stages), f"{m['wall']:.2f}",
                     ratio(m["wall"], base["wall"]), f"{m['per_site']:.3f}", ratio(m["per_site"], base["per_site"]),
                     f"{m['compute_per_site']:.3f}", f"{m['server']:.3f}", f"{r['startup_s']:.1f}",
                     f"{r['peak_driver_rss'] / MB:.0f}", ratio(r["peak_driver_rss"], base_r["peak_driver_rss"]),
                     f"{r['peak_rss'] / MB:.0f}", ratio(r["peak_rss"], base_r["peak_rss"]),
                     f"{r['peak_pss'] / MB:.0f}", ratio(r["peak_pss"], base_r["peak_pss"]), str(r["max_procs"]),
                     str(len(r["leftover"])),
                     "/".join(f"{r['cpu'].get(k, 0.0):.0f}" for k in ("driver", "workers", "ray daemons")),
                     f"{r['load'][0]:.1f}->{r['load'][1]:.1f}"])
    secure = " under secure aggregation" if args.scale_secagg else ""
    table(f"3. Many sites: {preset} model, {args.scale_strategy}{secure}, 1 local step, Ray with 1 CPU and 1 thread per site "
          f"(2 sites at once); medians over {args.scale_rounds} rounds; wall = mean of the stages; ratios against "
          f"{base_n} sites; compute = Σ site handler time / sites; server = validate+aggregate+other+ckpt per round; "
          "coordinator = the driver process (ServerApp, SuperLink state); tree = driver, Ray daemons and workers",
          ["sites", *(f"{s} s" for s in stages), "wall s", "ratio", "s/site", "ratio", "compute s/site", "server s",
           "startup s", "coordinator peak RSS MB", "ratio", "tree peak RSS MB", "ratio", "peak PSS MB", "ratio",
           "procs", "left over",
           "CPU s driver/workers/daemons", "load avg"], rows)
    return results


def _catalog_preset(preset: str) -> str:
    """The preset whose indexed catalogs a preset trains on (micro is tiny's volumes)."""
    return "tiny" if preset == "micro" else preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="part 1 tiny only, 3 rounds of 1 step; part 3 with 3 and 8 sites: a few minutes")
    parser.add_argument("--parts", default="overhead,bytes,scale", help="comma-separated: overhead,bytes,scale")
    parser.add_argument("--data", type=Path, default=None, help="data and run folder, kept for reuse (default: a "
                                                                "temporary folder, removed at the end)")
    parser.add_argument("--out", type=Path, default=None, help="also write every measured figure to this JSON file")
    parser.add_argument("--presets", default="tiny,small", help="presets of part 1")
    # small on 2 CPU cores: ~10-20 s per site for one pretrain step, so 1 step and 2 rounds.
    parser.add_argument("--rounds", default="tiny=3,small=2", help="rounds per stage per preset in part 1 "
                                                                   "(median reported)")
    parser.add_argument("--steps", default="tiny=3,small=1", help="local steps per round per preset in part 1")
    parser.add_argument("--batch", type=int, default=2, help="site batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per site in part 1 (0: every core)")
    parser.add_argument("--series", type=int, default=12, help="series per synthetic site")
    parser.add_argument("--sites", default="3,20,50", help="site counts of part 3; the first is the baseline")
    parser.add_argument("--scale-rounds", type=int, default=3, help="rounds per stage in part 3")
    parser.add_argument("--scale-preset", default="micro", choices=["micro", "tiny", "small"],
                        help="encoder preset of part 3 (small: updates of 131 MB, the coordinator-memory check)")
    parser.add_argument("--scale-strategy", default="fedavg", help="aggregation strategy of part 3 (e.g. fedtrimmedavg)")
    parser.add_argument("--scale-stages", default="pretrain,align", help="stages of part 3")
    parser.add_argument("--scale-secagg", action="store_true", help="part 3 under secure aggregation")
    parser.add_argument("--scale-overrides", default="", help="comma-separated config overrides of part 3, e.g. "
                        "ssl.local_crops_number=1 (less compute per site, the same parameters on the wire)")
    parser.add_argument("--ckpt-repeats", type=int, default=3, help="checkpoint writes timed per preset in part 2")
    args = parser.parse_args()
    if args.quick:
        # Still 3 rounds: the median then leaves out the first, which pays for imports in the Ray actors.
        args.presets, args.rounds, args.steps, args.sites = "tiny", "tiny=3", "tiny=1", "3,8"
    args.presets = args.presets.split(",")
    args.rounds, args.steps = ({k: int(v) for k, v in (item.split("=") for item in text.split(","))}
                               for text in (args.rounds, args.steps))
    args.sites = [int(n) for n in args.sites.split(",")]
    args.scale_stages = args.scale_stages.split(",")
    args.scale_overrides = [o for o in args.scale_overrides.split(",") if o]
    args.byte_presets = ["tiny", "small", "base"]
    parts = set(args.parts.split(","))

    import torch

    cpus = os.cpu_count() or 1
    threads = args.threads or cpus
    work = args.data or Path(tempfile.mkdtemp(prefix="fedmri-bench-federation-"))
    start = time.perf_counter()
    print(f"machine: {cpus} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; torch {torch.__version__}; "
          f"work folder {work}")
    results: dict[str, Any] = {}
    try:
        need = ["tiny"] + (["small"] if ("overhead" in parts and "small" in args.presets)
                           or ("scale" in parts and _catalog_preset(args.scale_preset) == "small") else [])
        catalogs = prepare_catalogs(work / "data", need, args.series) if parts & {"overhead", "scale"} else {}
        overhead = part_overhead(args, catalogs, work, cpus, threads) if "overhead" in parts else {}
        results["overhead"] = overhead
        if "bytes" in parts:
            results["bytes"] = part_bytes(args, overhead, work)
        if "scale" in parts:
            results["scale"] = part_scale(args, catalogs, work)
    finally:
        if args.data is None:
            shutil.rmtree(work, ignore_errors=True)
    # multiprocessing's resource tracker is this process's own helper and ends with it.
    stray = [p for p in psutil.Process().children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    print(f"\nprocesses left under this one at the end (besides multiprocessing's resource tracker): "
          f"{len(stray)}; total {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
