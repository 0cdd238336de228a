"""Transfer to a hospital outside the federation: the federated encoder against random init (issue 6).

Runs ``fedmri simulate --mode federated --mode random`` on the embedded demo
federation (3 synthetic hospitals, tiny preset, pretrain 3x20 ->
align 2x20 -> heads 2x20 -> evaluate) once per seed. The random mode tunes the
same heads the same way on a randomly initialised encoder. Both are scored on
the held-out hospital (from a seed of its own, a vendor no site
has). Prints each seed's figures, the medians over seeds and the median of the
per-seed differences (federated - random).

    python benchmarks/bench_transfer.py --seeds 0 1 2 3 --out /tmp/transfer   # ~4 min a seed on 2 cores
    python benchmarks/bench_transfer.py --seeds 0 1 2 3 --out /tmp/transfer --reuse   # only read
    python benchmarks/bench_transfer.py --out /tmp/bigger series_per_site=72 federation.stages.0.rounds=6

Reading it: report->image retrieval has one query per held-out study (~40 at
the default 150 series, ~12 at the 48 of the runs in RESULTS.md), so R@5 moves
in steps of 1/queries. ``findings AUROC`` is over every series and so also rewards
telling the body regions apart (effusion is never seen in a brain), which
random features do well; ``AUROC in region`` keeps only diseased against healthy
series of the same region.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METRICS = {"t2i_r5": "t2i R@5", "t2i_medr": "t2i MdR", "i2t_r5": "i2t R@5", "findings_auroc_macro": "findings AUROC",
           "findings_auroc_in_region_macro": "AUROC in region", "body_region_accuracy": "region acc",
           "sequence_accuracy": "sequence acc"}
MODES = ("federated", "random")


def run(seed: int, out: Path, reuse: bool, overrides: list[str]) -> dict[str, dict[str, float]]:
    """The held-out hospital's evaluation of each mode for one seed."""
    name = f"transfer-s{seed}"
    results = out / name / "results.json"
    if not (reuse and results.is_file()):
        cmd = [sys.executable, "-m", "fedmri.cli", "simulate", *(a for m in MODES for a in ("--mode", m)),
               f"federation.name={name}", f"federation.seed={seed}", f"federation.run_root={out}", *overrides]
        start = time.perf_counter()
        log = out / f"{name}.log"
        out.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"seed {seed}: fedmri simulate failed (exit {done.returncode}); its output is in {log}")
        print(f"  seed {seed}: {time.perf_counter() - start:.0f} s (log {log})", flush=True)
    return json.loads(results.read_text())["holdout"]


def _row(label: str, values: dict[str, float | None]) -> str:
    return f"{label:22}" + "".join(f"{'-' if values.get(m) is None else format(values[m], '.3f'):>16}"
                                   for m in METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of rerunning them")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="simulate overrides, e.g. series_per_site=72")
    args = parser.parse_args()
    runs = {seed: run(seed, args.out, args.reuse, args.overrides) for seed in args.seeds}

    print("\nheld-out hospital" + " " * 5 + "".join(f"{label:>16}" for label in METRICS.values()))
    for seed, modes in runs.items():
        for mode in MODES:
            print(_row(f"seed {seed} {mode}", modes.get(mode, {})))

    def median(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    print()
    for mode in MODES:
        print(_row(f"median {mode}", {m: median([r[mode].get(m) for r in runs.values()]) for m in METRICS}))
    diffs = {m: [r["federated"][m] - r["random"][m] for r in runs.values()
                 if r["federated"].get(m) is not None and r["random"].get(m) is not None] for m in METRICS}
    print(_row("median fed - random", {m: median(d) for m, d in diffs.items()}))
    print(_row("min fed - random", {m: min(d) if d else None for m, d in diffs.items()}))
    print(_row("max fed - random", {m: max(d) if d else None for m, d in diffs.items()}))


if __name__ == "__main__":
    main()
