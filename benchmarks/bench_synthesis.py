"""How long does `fedmri simulate` take to synthesise and index its hospitals, largest first against job order?

Runs the data step of `fedmri simulate` (:func:`fedmri.simulations.runner.prepare_sites`)
on its embedded default (3 sites of ``series_per_site`` series and one held-out
hospital of ``holdout_series``) twice in the same sitting, in fresh folders:

- *job order*: the pool starts the hospitals in the order the simulation lists
  them (sites, then the held-out one), as before 2026-12-08;
- *largest first*: the order :func:`~fedmri.simulations.runner.largest_first` gives.

It prints each wall time and their ratio. Figures are printed, never asserted
(docs/architecture.md, "Benchmarks").

    .venv/bin/python benchmarks/bench_synthesis.py [--workers 0] [OVERRIDE ...]

``OVERRIDE``s are `fedmri simulate`'s (e.g. ``series_per_site=16 holdout_series=48``,
test_transfer's sizes).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from fedmri.simulations import runner


def timed(sim, folder: Path, order) -> float:
    """Seconds for prepare_sites with the pool fed in ``order``."""
    chosen = runner.largest_first
    runner.largest_first = order
    try:
        start = time.perf_counter()
        runner.prepare_sites(sim, folder, say=lambda line: None)
        return time.perf_counter() - start
    finally:
        runner.largest_first = chosen
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="synth_workers (0: one per core)")
    parser.add_argument("overrides", nargs="*", help="fedmri simulate overrides")
    args = parser.parse_args()
    sim = runner.load_simulation(None, [f"synth_workers={args.workers}", *args.overrides])
    sizes = [int(sim.series_per_site)] * int(sim.sites) + [int(sim.holdout_series or sim.series_per_site)] * int(
        sim.holdout_sites)
    print(f"hospitals of {sizes} series ({sim.synth_preset} preset), synth_workers={args.workers or 'one per core'}")
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        fifo = timed(sim, Path(tmp) / "job-order", lambda jobs: list(range(len(jobs))))
        print(f"job order:     {fifo:6.1f} s")
        lpt = timed(sim, Path(tmp) / "largest-first", runner.largest_first)
        print(f"largest first: {lpt:6.1f} s")
    print(f"ratio largest first / job order: {lpt / fifo:.2f}")


if __name__ == "__main__":
    main()
