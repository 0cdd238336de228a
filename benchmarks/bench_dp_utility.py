"""Utility of the federated encoder under sample-level DP against without DP (issue 5).

Runs ``fedmri simulate --mode federated`` on the embedded demo federation
(3 synthetic hospitals, tiny preset, pretrain 3x20 -> align 2x20 -> evaluate)
twice per seed: without DP, and with DP-SGD in both training stages
(pretrain target ε 6, align target ε 4 with the DP-valid fixed-negative
objective; the sites' ledgers compose them to about 7.5 at δ 1e-5, under 8).
Prints the evaluation of each run, the medians over seeds and the DP / no-DP
ratio of each median, and each site's ε from the run's ``privacy.json``.

    python benchmarks/bench_dp_utility.py --seeds 0 1 2 --out /tmp/dp-utility   # ~25 min on 2 cores
    python benchmarks/bench_dp_utility.py --seeds 0 1 2 --out /tmp/dp-utility --reuse   # only read

The demo's validation splits hold 11-15 series in all, so one series moves a
probe accuracy by 0.07-0.09: read differences below that as noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

def dp_overrides(align_epsilon: float) -> list[str]:
    """DP-SGD in pretraining (target ε 6) and alignment (``align_epsilon``; the ledgers compose the two)."""
    return ["federation.stages.0.dp.enabled=true", "federation.stages.0.dp.target_epsilon=6",
            "federation.stages.1.dp.enabled=true", f"federation.stages.1.dp.target_epsilon={align_epsilon:g}",
            "federation.overrides=[align.dp_negatives=synthetic]"]


METRICS = ["knn_sequence_acc", "knn_body_region_acc", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "t2i_medr"]


def run(name: str, seed: int, out: Path, extra: list[str], reuse: bool) -> dict:
    folder = out / name / "federated"
    if not (reuse and (folder / "results.json").is_file()):
        cmd = [sys.executable, "-m", "fedmri.cli", "simulate", "--mode", "federated", f"federation.name={name}",
               f"federation.seed={seed}", f"federation.run_root={out}", *extra]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    results = json.loads((folder / "results.json").read_text())["evaluation"]
    privacy = folder / "privacy.json"
    eps = {}
    if privacy.is_file():
        # The run's ε after its last private stage (epsilon_total is undefined once a stage ran without DP).
        eps = {site: max(st["epsilon_run"] for st in s["stages"].values() if st.get("epsilon_run") is not None)
               for site, s in json.loads(privacy.read_text())["sites"].items()
               if any(st.get("epsilon_run") is not None for st in s["stages"].values())}
    return {"metrics": results, "epsilon": eps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/dp-utility"))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of rerunning them")
    parser.add_argument("--units", nargs="+", default=["patient", "series"], choices=["patient", "series"],
                        help="the sites' private unit (policy.dp.unit) of the DP runs")
    parser.add_argument("--skip-no-dp", action="store_true", help="leave the no-DP runs out")
    parser.add_argument("--align-epsilon", type=float, default=4.0,
                        help="alignment's target ε (4: the ledgers end near 7.3; 5.2: near 8)")
    args = parser.parse_args()
    dp = dp_overrides(args.align_epsilon)
    tag = "" if args.align_epsilon == 4.0 else f"-a{args.align_epsilon:g}"
    rows: dict[str, list[dict]] = {"no DP": [], "DP": []} if args.units == ["series"] else {"no DP": []}
    for seed in args.seeds:
        if not args.skip_no_dp:
            rows["no DP"].append(run(f"nodp-s{seed}", seed, args.out, [], args.reuse))
        for unit in args.units:
            label = "DP" if args.units == ["series"] else f"DP {unit}"
            # The private unit of every site's DP-SGD (policy.dp.unit): patient or series.
            rows.setdefault(label, []).append(run(f"dp8-{unit}{tag}-s{seed}", seed, args.out,
                                                  [*dp, f"site_overrides=[policy.dp.unit={unit}]"], args.reuse))
    rows = {label: runs for label, runs in rows.items() if runs}
    print(f"\n{'run':8} {'seed':>4} " + " ".join(f"{m:>19}" for m in METRICS) + "  site ε (δ 1e-5)")
    for label, runs in rows.items():
        for seed, r in zip(args.seeds, runs):
            eps = ", ".join(f"{v:.2f}" for v in r["epsilon"].values()) or "-"
            print(f"{label:8} {seed:>4} " + " ".join(f"{r['metrics'].get(m, float('nan')):>19.3f}" for m in METRICS)
                  + f"  {eps}")
    medians = {label: {m: statistics.median(r["metrics"][m] for r in runs) for m in METRICS}
               for label, runs in rows.items()}
    print()
    for label in rows:
        print(f"{'median ' + label:13}" + " ".join(f"{medians[label][m]:>19.3f}" for m in METRICS))
    base = "no DP" if "no DP" in medians else None
    for label in [k for k in medians if k != "no DP"]:
        other = base or next((k for k in medians if k != label), None)
        if other is None:
            continue
        print(f"{label[:13] + ' / ' + other:13}" + " ".join(
            f"{medians[label][m] / medians[other][m] if medians[other][m] else float('nan'):>19.2f}"
            for m in METRICS))


if __name__ == "__main__":
    main()
