"""Transfer to a hospital outside the federation: every mode, over seeds, against issue 15's targets.

Runs ``fedmri simulate`` on the embedded demo federation (3 synthetic
hospitals, tiny preset, pretrain 3x20 -> align 2x20 -> heads 2x20 -> evaluate,
a balanced 150-series held-out hospital) once per seed, with the modes asked
for (default: all five). Prints each seed's held-out figures, the medians over
seeds, the median of the per-seed differences, issue 15's acceptance checks
(federated in-region AUROC >= 0.75 and >= random + 0.15, >= local + 0.05,
>= central - 0.05; age MAE <= 0.7x that of predicting the training mean; sex
AUROC >= 0.7), and in how many seeds the held-out hospital found each paired
difference significant (``holdout_differences`` of results.json).

    python benchmarks/bench_transfer.py --seeds 0 1 2 3 --out /tmp/transfer   # ~8 min a seed on 2 cores
    python benchmarks/bench_transfer.py --seeds 0 1 2 3 --out /tmp/transfer --reuse   # only read
    python benchmarks/bench_transfer.py --modes federated random --out /tmp/fr series_per_site=72

Reading it: report->image retrieval has one query per held-out study (~40 at
the default 150 series), so R@5 moves in steps of 1/queries. ``findings AUROC``
is over every series and so also rewards telling the body regions apart
(effusion is never seen in a brain), which random features do well; ``AUROC
in region`` keeps only diseased against healthy series of the same region.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METRICS = {"t2i_r5": "t2i R@5", "t2i_medr": "t2i MdR", "findings_auroc_macro": "findings AUROC",
           "findings_auroc_in_region_macro": "AUROC in region",
           "zeroshot_findings_auroc_in_region_macro": "0-shot in reg", "body_region_accuracy": "region acc",
           "age_mae": "age MAE", "sex_auroc": "sex AUROC"}
ALL_MODES = ("federated", "random", "local", "central", "ceiling")
MODES = ALL_MODES
IN_REGION = "findings_auroc_in_region_macro"


def run(seed: int, out: Path, reuse: bool, overrides: list[str]) -> dict[str, Any]:
    """results.json of one seed's simulation."""
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
    return json.loads(results.read_text())


def mean_predictor_mae(folder: Path) -> float | None:
    """Held-out age MAE of predicting the mean age of the federation's training series."""
    from fedmri.data.catalog_db import open_catalog, series_rows

    catalogs = folder / "data" / "catalogs"
    ages: dict[str, list[float]] = {"train": [], "held": []}
    for catalog in sorted(catalogs.iterdir()) if catalogs.is_dir() else []:
        held = catalog.name.startswith("holdout")
        conn = open_catalog(catalog)
        try:
            rows = series_rows(conn, None if held else "train")
        finally:
            conn.close()
        ages["held" if held else "train"] += [float(r["age"]) for r in rows if r["age"] is not None]
    if not ages["train"] or not ages["held"]:
        return None
    mean = statistics.fmean(ages["train"])
    return statistics.fmean(abs(a - mean) for a in ages["held"])


def _row(label: str, values: dict[str, float | None]) -> str:
    return f"{label:22}" + "".join(f"{'-' if values.get(m) is None else format(values[m], '.3f'):>16}"
                                   for m in METRICS)


def main() -> None:
    global MODES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--modes", nargs="+", choices=ALL_MODES, default=list(ALL_MODES))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of rerunning them")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="simulate overrides, e.g. series_per_site=72")
    args = parser.parse_args()
    MODES = tuple(args.modes)
    results = {seed: run(seed, args.out, args.reuse, args.overrides) for seed in args.seeds}
    runs = {seed: r["holdout"] for seed, r in results.items()}

    print("\nheld-out hospital" + " " * 5 + "".join(f"{label:>16}" for label in METRICS.values()))
    for seed, modes in runs.items():
        for mode in MODES:
            print(_row(f"seed {seed} {mode}", modes.get(mode, {})))

    def median(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    def differences(a: str, b: str) -> dict[str, list[float]]:
        return {m: [r[a][m] - r[b][m] for r in runs.values()
                    if r.get(a, {}).get(m) is not None and r.get(b, {}).get(m) is not None] for m in METRICS}

    print()
    for mode in MODES:
        print(_row(f"median {mode}", {m: median([r.get(mode, {}).get(m) for r in runs.values()]) for m in METRICS}))
    for other in [m for m in MODES if m != "federated"]:
        diffs = differences("federated", other)
        print(_row(f"median fed - {other}", {m: median(d) for m, d in diffs.items()}))
        if len(results) > 1:
            print(_row("  min", {m: min(d) if d else None for m, d in diffs.items()}))
            print(_row("  max", {m: max(d) if d else None for m, d in diffs.items()}))

    # Issue 15's acceptance, on the medians over seeds.
    fed = {m: median([r.get("federated", {}).get(m) for r in runs.values()]) for m in METRICS}
    maes = [mean_predictor_mae(args.out / f"transfer-s{seed}") for seed in results]
    mean_mae = median(maes)
    print("\nacceptance (issue 15), medians over seeds", args.seeds)

    def check(label: str, value: float | None, target: str, ok: bool | None) -> None:
        shown = "-" if value is None else f"{value:.3f}"
        print(f"  {label:42} {shown:>8}   target {target:12} {'met' if ok else 'NOT met'}")

    v = fed.get(IN_REGION)
    check("federated AUROC in region", v, ">= 0.75", v is not None and v >= 0.75)
    for other, margin in (("random", 0.15), ("local", 0.05), ("central", -0.05)):
        d = median(differences("federated", other)[IN_REGION]) if other in MODES else None
        check(f"federated - {other} AUROC in region", d, f">= {margin:+.2f}", d is not None and d >= margin)
    ratio = fed["age_mae"] / mean_mae if fed.get("age_mae") is not None and mean_mae else None
    check(f"age MAE / mean predictor's ({mean_mae or float('nan'):.1f} y)", ratio, "<= 0.70",
          ratio is not None and ratio <= 0.7)
    check("sex AUROC", fed.get("sex_auroc"), ">= 0.70", (fed.get("sex_auroc") or 0) >= 0.7)

    # Paired differences at the held-out hospital, per seed.
    print("\npaired differences federated - <mode> at the held-out hospital (95% CI over its patients)")
    for seed, r in results.items():
        for hospital, found in (r.get("holdout_differences") or {}).items():
            for metric, by_mode in found.get("differences", {}).items():
                cells = [f"{mode} {d['value']:+.3f} [{d['low']:+.3f},{d['high']:+.3f}]{'*' if d['significant'] else ''}"
                         for mode, d in by_mode.items()]
                print(f"  seed {seed} {metric:32} " + "  ".join(cells))
    print("  * significant (the interval leaves out 0)")


if __name__ == "__main__":
    main()
