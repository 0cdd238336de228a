"""A base-size deployment on localhost, run several times in a row: does every run complete?

Issue 18 found that a `base` deployment (2 sites, pretrain then heads) failed 2 runs in 4:
with ``fedmri server start``'s SuperLink keeping its state in SQLite (``--database
STATE/state.db``), flwr 1.42 stores every message's payload there too, and under the 892 MB
pretrain messages requests waited past SQLite's 5 s busy timeout (``database is locked``).

This script starts a SuperLink and N SuperNodes as docs/deployment.md does (TLS, node keys),
with ``--store disk`` (SQLite) or ``--store memory`` (Flower's in-memory store), and submits
the same `base` federation ``--runs`` times. Per run it prints: exit status, wall time, the
cause of a failure, the peak RSS of each kind of process, the seconds from ``fedmri run`` to the
first ClientApp process, and the state folder's size after the run. Per round (from the run's
``metrics.jsonl``): wall time from sending to the last reply, the slowest site's own work (its
ClientApp handler time, ``wall-time-s``), the overhead between them, and the bytes each site
received and sent. At the end, a table of the medians over the completed runs.

``--trace`` sets ``FEDMRI_TRACE`` (:mod:`fedmri.trace`) for every process and breaks each round
down: building the messages, pushing them to the SuperLink, each site's ClientApp starting
(process start after the push: the SuperNode pulling the message and launching the process),
its imports, receiving the message, its inputs (site file, weights from the wire), training,
its reply's arrays, the reply's way back to the coordinator, and aggregating. It also sums each
kind of process' CPU seconds (from ``/proc``, every 0.25 s) over five parts of the round: the
push, until the last site has its inputs, until the last site's handler ends, until the last
reply is pulled, and aggregating; with the cores they kept busy, this shows which process a part
waits on.

    python benchmarks/bench_deploy_base.py --store disk --runs 3
    python benchmarks/bench_deploy_base.py --store memory --runs 3
    python benchmarks/bench_deploy_base.py --store memory --runs 1 --trace
    python benchmarks/bench_deploy_base.py --store memory --runs 2 --trace --wire float32 bf16-up bf16
    python benchmarks/bench_deploy_base.py --store memory --runs 1 --heads-rounds 2   # heads bytes once cached
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from _deploy import Deployment
from _harness import boot_folder, cpu_seconds

MB = 1e6
# --wire: the federation's (uplink, downlink).
WIRES = {"float32": ("float32", "float32"), "bf16-up": ("bf16", "float32"), "bf16": ("bf16", "bf16")}
PATTERNS = {"round1": r"fedmri: pretrain round 1/1 done in ([\d.]+) s", "heads": r"fedmri: heads round 1/\d+ done in ([\d.]+) s",
            "cause": r"cause: (.*)$", "locked": r"(database is locked)"}


def _sites(root: Path, n: int, series: int, preset: str) -> list[Path]:
    """``n`` synthetic hospitals of ``series`` series each, indexed for ``preset``; their catalogs."""
    from fedmri.config import load_config
    from fedmri.simulations.runner import synthesise_site

    cfg = load_config(preset)
    return [synthesise_site(cfg, root, f"site-{i:02d}", i, 0, lambda _: None, "tiny", series).catalog
            for i in range(1, n + 1)]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakSampler(threading.Thread):
    """Peak RSS per role (superlink, serverapp, clientapp...) of a deployment's processes, and their CPU.

    ``cpu`` holds ``(time, role, CPU seconds since the last sample)`` every 0.25 s: the processes
    alive at the first sample count from then, later ones from their start.
    """

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(daemon=True)
        self.deployment, self.stop_event = deployment, threading.Event()
        self.peak: dict[str, float] = {}
        self.started = time.perf_counter()
        self.first_seen: dict[str, float] = {}  # role -> seconds from start() to its first process
        self.cpu: list[tuple[float, str, float]] = []
        self._used: dict[int, float] = {}

    def run(self) -> None:
        first = True
        while not self.stop_event.wait(0.25):
            now = time.time()
            for role, pids in self.deployment.processes().items():
                self.first_seen.setdefault(role, time.perf_counter() - self.started)
                for pid in pids:
                    self.peak[role] = max(self.peak.get(role, 0.0), _rss_mb(pid))
                    used = cpu_seconds(pid)
                    if used is None:
                        continue
                    before = self._used.get(pid, used if first else 0.0)
                    self._used[pid] = used
                    if used > before:
                        self.cpu.append((now, role, used - before))
            first = False


def _label(seen: dict[str, int], stage: str) -> str:
    """``stage`` the first time it is seen, then ``"stage 2"``, ``"stage 3"``: a stage's later rounds apart."""
    seen[stage] = seen.get(stage, 0) + 1
    return stage if seen[stage] == 1 else f"{stage} {seen[stage]}"


def _rounds(metrics: Path) -> list[dict[str, float | str]]:
    """Per round of a run: wall, slowest site's work, overhead, bytes per site both ways."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    out = []
    seen: dict[str, int] = {}
    for agg in (r for r in rows if r.get("site") == "all"):
        sites = [r for r in rows if r["server_round"] == agg["server_round"] and r.get("status") == "ok"]
        slowest = max((r.get("wall-time-s", 0.0) for r in sites), default=0.0)
        out.append({"stage": _label(seen, agg["stage"]), "wall": agg["wall-time-s"], "slowest": slowest,
                    "overhead": agg["wall-time-s"] - slowest,
                    "down_mb": max((r.get("bytes-down", 0) for r in sites), default=0) / MB,
                    "up_mb": max((r.get("bytes-up", 0) for r in sites), default=0) / MB})
    return out


PHASES = ("build", "push", "to clientapp start", "clientapp imports", "message in", "inputs", "train",
          "reply arrays", "reply back", "aggregate")


WINDOWS = ("push", "message in", "sites at work", "reply back", "aggregate")


def _cpu_windows(bounds: list[float], cpu: list[tuple[float, str, float]]) -> dict[str, dict]:
    """CPU seconds per role in each of the round's WINDOWS, between consecutive ``bounds``.

    The windows: the push; until the last site has its inputs; until the last site's handler
    ends; until the last reply is pulled; until the round is done.
    """
    out = {}
    for name, (lo, hi) in zip(WINDOWS, zip(bounds, bounds[1:])):
        roles: dict[str, float] = {}
        for t, role, used in cpu:
            if lo < t <= hi:
                roles[role] = roles.get(role, 0.0) + used
        out[name] = {"wall": hi - lo, "roles": roles}
    return out


def _breakdown(trace: Path, cpu: list[tuple[float, str, float]] = ()) -> list[dict[str, float | str]]:
    """Per round: seconds of each phase (PHASES); per-site phases are the slowest site's.

    With ``cpu`` (:class:`PeakSampler`'s samples) a round's row also holds ``"cpu"``: each
    process role's CPU seconds in each of WINDOWS.
    """
    if not trace.is_file():
        return []
    events = sorted((json.loads(line) for line in trace.read_text().splitlines() if line.strip()),
                    key=lambda e: e["t"])
    started = {e["pid"]: e["started"] for e in events if e["event"] == "clientapp-imported"}
    imported = {e["pid"]: e["t"] for e in events if e["event"] == "clientapp-imported"}
    out = []
    seen: dict[str, int] = {}
    for start in (e for e in events if e["event"] == "round-start"):
        done = next((e for e in events if e["event"] == "round-done" and e["t"] > start["t"]), None)
        if done is None:
            continue
        inside = [e for e in events if start["t"] <= e["t"] <= done["t"]]
        first = {name: next((e for e in inside if e["event"] == name), None)
                 for name in ("messages-built", "push-start", "push-done")}
        if None in first.values():
            continue
        row: dict[str, float | str] = {"stage": _label(seen, start["stage"]),
                                       "build": first["messages-built"]["t"] - start["t"],
                                       "push": first["push-done"]["t"] - first["push-start"]["t"]}
        sites: dict[int, dict[str, float]] = {}
        for e in inside:
            if "node" in e and e["event"] != "reply":
                sites.setdefault(e["node"], {})[e["event"]] = e["t"]
                sites[e["node"]].setdefault("pid", e["pid"])
            elif e["event"] == "reply":
                sites.setdefault(e["node"], {})["reply"] = e["t"]
        last_reply = max((s.get("reply", 0.0) for s in sites.values()), default=done["t"])
        for node, s in sites.items():
            pid = s.get("pid")
            if pid not in started or "handler-end" not in s or "reply" not in s:
                continue
            phases = {"to clientapp start": started[pid] - first["push-done"]["t"],
                      "clientapp imports": imported[pid] - started[pid],
                      "message in": s["handler-start"] - imported[pid],
                      "inputs": s.get("handler-inputs", s["handler-start"]) - s["handler-start"],
                      "train": s.get("handler-trained", s["handler-end"]) - s.get("handler-inputs", s["handler-start"]),
                      "reply arrays": s["handler-end"] - s.get("handler-trained", s["handler-end"]),
                      "reply back": s["reply"] - s["handler-end"]}
            print(f"           node {node}: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
                  + (f", offered after {s['offered'] - s['reply']:.1f}" if "offered" in s else ""), flush=True)
            for k, v in phases.items():  # negative: the ClientApp started before the last message was pushed
                row[k] = max(float(row[k]), v) if k in row else v
        row["aggregate"] = done["t"] - last_reply
        ends = [s["handler-end"] for s in sites.values() if "handler-end" in s]
        inputs = [s.get("handler-inputs", s["handler-start"]) for s in sites.values() if "handler-start" in s]
        if cpu and ends and inputs:
            row["cpu"] = _cpu_windows([first["push-start"]["t"], first["push-done"]["t"], max(inputs), max(ends),
                                       last_reply, done["t"]], cpu)
            for name, w in row["cpu"].items():
                print(f"           CPU in {name} ({w['wall']:.1f} s): " + ", ".join(
                    f"{k} {v:.1f}" for k, v in sorted(w["roles"].items())) + f"; {_busy(w):.2f} cores busy", flush=True)
        out.append(row)
    return out


def _busy(window: dict) -> float:
    """Cores kept busy on average in a window by the deployment's processes."""
    return sum(window["roles"].values()) / window["wall"] if window["wall"] > 0 else 0.0


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("disk", "memory"), default="disk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--series", type=int, default=8, help="series per site")
    parser.add_argument("--chunk-mb", type=float, default=0,
                        help="Flower's array chunk size for every process (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE; "
                        "Flower's default 5 MB when 0)")
    parser.add_argument("--heads-rounds", type=int, default=1,
                        help="heads rounds; from the 2nd a site holds the frozen encoder and is sent the heads only")
    parser.add_argument("--keep", default="", help="keep the data and deployment in this folder")
    parser.add_argument("--trace", action="store_true", help="break each round down (FEDMRI_TRACE)")
    parser.add_argument("--wire", nargs="+", default=["float32"], choices=tuple(WIRES),
                        help="float32, bf16-up (uplink: bf16) or bf16 (uplink and downlink); several: the runs "
                        "alternate them, one table each")
    parser.add_argument("--tree", default="", help="deploy another fedmri checkout instead (with --store "
                        "disk for trees that have no --store)")
    args = parser.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedmri-base-"))
    try:
        print(f"[data] {args.sites} sites x {args.series} series for {args.preset} ...", flush=True)
        catalogs = _sites(tmp / "data", args.sites, args.series, args.preset)
        tree = str(Path(args.tree).resolve()) if args.tree else ""
        store = args.store  # a tree older than 3721207 has no --store: its SuperLink uses SQLite (--store disk)
        trace = tmp / "trace.jsonl"
        if args.trace:  # every process the deployment starts inherits it
            os.environ["FEDMRI_TRACE"] = str(trace)
        if args.chunk_mb:  # read by flwr at import, in every process (it splits what it sends)
            os.environ["FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"] = str(int(args.chunk_mb * 2**20))
        deployment = Deployment(tmp / f"deploy-{store}", catalogs, tree=tree, boot=boot_folder(tmp),
                                server_args=[] if tree and store == "disk" else ["--store", store])
        # The runs share one deployment, whose state folder keeps every run's folder: count each run's growth.
        rows, before_mb = [], _folder_mb(deployment.state)
        try:
            for r in range(args.runs * len(args.wire)):  # --runs of each wire, alternated
                wire = args.wire[r % len(args.wire)]
                config = deployment.root / f"run-{r}.yaml"
                config.write_text(textwrap.dedent(f"""
                    name: base-{r}
                    preset: {args.preset}
                    min_sites: {args.sites}
                    wait_for_sites_s: 120
                    round_timeout_s: 1800
                    export: false
                    uplink: {WIRES[wire][0]}
                    downlink: {WIRES[wire][1]}
                    overrides: ["ssl.warmup_fraction=0"]
                    stages:
                      - {{name: pretrain, rounds: 1, local_steps: 1}}
                      - {{name: heads, rounds: {args.heads_rounds}, local_steps: 1}}
                """))
                trace.unlink(missing_ok=True)
                sampler = PeakSampler(deployment)
                sampler.start()  # its clock starts with `fedmri run`
                code, seen, output = deployment.run(config, timeout=3600, patterns=PATTERNS)
                sampler.stop_event.set()
                sampler.join()
                state_mb = _folder_mb(deployment.state)
                grown_mb, before_mb = state_mb - before_mb, state_mb
                db = deployment.state / "state.db"
                row = {"run": r + 1, "wire": wire, "code": code, "wall": seen["run"], "pretrain": seen.get("round1"),
                       "heads": seen.get("heads"), "locked": "locked" in seen or "database is locked" in output,
                       "cause": output.split("cause: ", 1)[1].splitlines()[0] if "cause: " in output else "",
                       "peak": dict(sampler.peak), "state_mb": state_mb, "grown_mb": grown_mb,
                       "first_clientapp": sampler.first_seen.get("clientapp"),
                       "rounds": _rounds(deployment.state / "runs" / f"base-{r}" / "metrics.jsonl"),
                       "db_mb": db.stat().st_size / MB if db.exists() else 0.0,
                       "breakdown": _breakdown(trace, sampler.cpu)}
                rows.append(row)
                print(f"[run {r + 1}, wire {wire}] exit {code} in {row['wall']:.0f} s; pretrain round {row['pretrain']} s, heads "
                      f"{row['heads']} s; locked: {row['locked']}; {row['cause']}; peak RSS MB "
                      + ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["peak"].items()))
                      + f"; state folder {state_mb:.0f} MB (+{grown_mb:.0f} MB by this run; state.db {row['db_mb']:.0f} MB); first ClientApp after "
                      + (f"{row['first_clientapp']:.1f} s" if row["first_clientapp"] is not None else "-"), flush=True)
                for rnd in row["rounds"]:
                    print(f"         {rnd['stage']}: wall {rnd['wall']:.1f} s, slowest site {rnd['slowest']:.1f} s, "
                          f"overhead {rnd['overhead']:.1f} s, {rnd['down_mb']:.1f} MB down / {rnd['up_mb']:.1f} MB "
                          "up per site", flush=True)
                for rnd in row["breakdown"]:
                    print(f"         {rnd['stage']} breakdown s: "
                          + ", ".join(f"{k} {rnd[k]:.1f}" for k in PHASES if k in rnd), flush=True)
                if code != 0:
                    (tmp / f"run-{r + 1}-{store}.log").write_text(output)
        finally:
            deployment.stop()
        done = sum(r["code"] == 0 for r in rows)
        walls = [r["wall"] for r in rows if r["code"] == 0]
        print(f"\n{args.tree or 'this tree'}, --store {store}: {done} of {len(rows)} runs completed"
              + (f"; median wall {statistics.median(walls):.0f} s" if walls else ""))
        for wire in args.wire:
            print(f"\nwire {wire}:")
            _summary([r for r in rows if r["code"] == 0 and r["wire"] == wire])
        print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _summary(rows: list[dict]) -> None:
    """Medians over the completed runs, as a Markdown table (RESULTS.md)."""
    if not rows:
        return
    med = statistics.median
    print("\n| round | wall s | slowest site s | overhead s | MB down / up per site |\n| --- | --- | --- | --- | --- |")
    for stage in dict.fromkeys(r["stage"] for row in rows for r in row["rounds"]):
        rounds = [r for row in rows for r in row["rounds"] if r["stage"] == stage]
        print(f"| {stage} | {med(r['wall'] for r in rounds):.1f} | {med(r['slowest'] for r in rounds):.1f} | "
              f"{med(r['overhead'] for r in rounds):.1f} (range {min(r['overhead'] for r in rounds):.1f}–"
              f"{max(r['overhead'] for r in rounds):.1f}) | {med(r['down_mb'] for r in rounds):.1f} / "
              f"{med(r['up_mb'] for r in rounds):.1f} |")
    roles = sorted({k for row in rows for k in row["peak"]})
    print("\n| process | peak RSS MB (median of runs) |\n| --- | --- |")
    for role in roles:
        print(f"| {role} | {med(row['peak'].get(role, 0.0) for row in rows):.0f} |")
    staged = [r for row in rows for r in row.get("breakdown", [])]
    if staged:
        print("\n| round | " + " | ".join(PHASES) + " |\n| --- |" + " --- |" * len(PHASES))
        for stage in dict.fromkeys(r["stage"] for r in staged):
            rounds = [r for r in staged if r["stage"] == stage]
            print(f"| {stage} | " + " | ".join(f"{med(float(r.get(k, 0.0)) for r in rounds):.1f}" for k in PHASES) + " |")
    timed = [r for r in staged if "cpu" in r]
    if timed:
        roles = sorted({k for r in timed for w in r["cpu"].values() for k in w["roles"]})
        print(f"\nCPU seconds by process in each part of a round (medians; {os.cpu_count()} cores):\n\n"
              "| round | part | wall s | cores busy | " + " | ".join(roles) + " |\n| --- | --- | --- | --- |"
              + " --- |" * len(roles))
        for stage in dict.fromkeys(r["stage"] for r in timed):
            rounds = [r for r in timed if r["stage"] == stage]
            for name in WINDOWS:
                ws = [r["cpu"][name] for r in rounds]
                print(f"| {stage} | {name} | {med(w['wall'] for w in ws):.1f} | {med(_busy(w) for w in ws):.2f} | "
                      + " | ".join(f"{med(w['roles'].get(k, 0.0) for w in ws):.1f}" for k in roles) + " |")
    firsts = [row["first_clientapp"] for row in rows if row["first_clientapp"] is not None]
    print(f"\nfirst ClientApp after `fedmri run`: median {med(firsts):.1f} s" if firsts else "")
    print(f"run wall: median {med(r['wall'] for r in rows):.0f} s; the state folder grew by a median "
          f"{med(r['grown_mb'] for r in rows):.0f} MB a run (checkpoints, metrics, logs)")


if __name__ == "__main__":
    main()
