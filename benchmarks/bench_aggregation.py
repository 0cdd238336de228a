"""The coordinator's memory while it takes in and aggregates one round of N site updates, without Ray.

``bench_federation.py --parts scale`` measures a whole simulated federation (Ray,
real ClientApps), which takes half an hour for 200 `small` sites on 2 cores. This
script isolates the coordinator's side: each configuration runs in a fresh
process that builds the `small` pretrain update groups (encoder, dino_head,
center: 131 MB in float32), then takes N site replies one by one as the pipeline
does (a reply is a Flower Message with serialised arrays, as pulled from the
Grid), and aggregates them. Printed per configuration: the process's peak RSS
(``VmHWM``) and wall time, and the ratio of the peak to the 3-site peak of the same
mode.

Modes:

- ``streamed``: ``RoundUpdates`` (updates in memory up to ``--memory-mb``, the rest
  spilled to a temporary folder) and the stage's Aggregator, as ``Pipeline.run_round``
  does since streaming aggregation;
- ``list``: every reply kept until the last one, then Flower's ``aggregate_train`` on
  the list, as the pipeline did before (only up to ``--list-max`` sites: it needs
  N x 131 MB and more).

    python benchmarks/bench_aggregation.py                       # 3, 50, 200 sites; fedavg and fedtrimmedavg
    python benchmarks/bench_aggregation.py --sites 3,20 --strategies fedmedian --preset tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(preset: str, n: int, strategy: str, mode: str, memory_mb: float) -> dict:
    """Run one configuration in this process; returns its figures."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers
    from fedmri import stages, wire
    from fedmri.config import load_config
    from fedmri.strategies import build_aggregator
    from fedmri.strategies.updates import RoundUpdates
    from helpers.identity import server_identity

    cfg = load_config(preset)
    up = stages.get("pretrain").groups(cfg).up
    current = wire.to_record(wire.select(wire.initial_state(cfg), up))
    start = {key: current[key].numpy() for key in current.keys()}
    nbytes = sum(a.nbytes for a in start.values())
    rng = np.random.default_rng(0)
    direction = {key: rng.normal(scale=1e-3, size=a.shape).astype(a.dtype) for key, a in start.items()}
    spec = {"name": strategy} | ({"beta": 0.2} if strategy == "fedtrimmedavg" else {})
    aggregator = build_aggregator(spec)

    def reply(i: int) -> Message:
        # A site's update: the start moved along one direction by a site-specific amount.
        arrays = ArrayRecord({key: Array(start[key] + direction[key] * np.float32(1 + i % 7))
                              for key in start})
        ask = Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + i})}),
                       reply_to=ask)

    t0 = time.perf_counter()
    with server_identity():
        if mode == "streamed":
            with tempfile.TemporaryDirectory(prefix="fedmri-agg-") as spill, \
                    RoundUpdates(current, memory_bytes=int(memory_mb * MB), spill_dir=spill) as updates:
                for i in range(n):
                    assert updates.offer(reply(i)) is None
                updates.reject_outliers(10.0)
                arrays, _ = aggregator.aggregate(1, current, updates)
                spilled = updates.spilled
        else:
            replies = [reply(i) for i in range(n)]
            arrays, _ = aggregator.strategy.aggregate_train(1, replies)
            spilled = 0
    wall = time.perf_counter() - t0
    assert arrays is not None and set(arrays.keys()) == set(start)
    return {"preset": preset, "sites": n, "strategy": strategy, "mode": mode, "update_mb": nbytes / MB,
            "peak_rss_mb": _peak_rss_mb(), "wall_s": wall, "spilled": spilled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sites", default="3,50,200")
    parser.add_argument("--strategies", default="fedavg,fedtrimmedavg")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="update_memory_mb of the streamed mode")
    parser.add_argument("--list-max", type=int, default=20, help="most sites of the list mode (it holds them all)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()
    if args.one:
        preset, n, strategy, mode = args.one.split(":")
        print(json.dumps(one(preset, int(n), strategy, mode, args.memory_mb)))
        return
    sites = [int(n) for n in args.sites.split(",")]
    rows = []
    for strategy in args.strategies.split(","):
        for mode in ("list", "streamed"):
            for n in sites:
                if mode == "list" and n > args.list_max:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", f"{args.preset}:{n}:{strategy}:{mode}",
                                      "--memory-mb", str(args.memory_mb)], capture_output=True, text=True,
                                     cwd=Path(__file__).parent)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{strategy} {mode} {n} sites failed")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"[{strategy} {mode} {n} sites] peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.1f} s, "
                      f"{row['spilled']} spilled", flush=True)
    print(f"\n{args.preset}: one update {rows[0]['update_mb']:.0f} MB; streamed with update_memory_mb "
          f"{args.memory_mb:.0f}; ratio = peak RSS / the 3-site peak of the same strategy and mode\n")
    print("| strategy | mode | sites | peak RSS MB | ratio | wall s | spilled |\n| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(r for r in rows if (r["strategy"], r["mode"]) == (row["strategy"], row["mode"]))
        print(f"| {row['strategy']} | {row['mode']} | {row['sites']} | {row['peak_rss_mb']:.0f} | "
              f"{row['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {row['wall_s']:.1f} | {row['spilled']} |")


if __name__ == "__main__":
    main()
