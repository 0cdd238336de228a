"""The supervised ceiling: can a network trained *with* labels find each disease in these volumes? (issue 15)

Synthesises a federation's sites and a held-out hospital with a balanced case
mix (the same generator and indexing as ``fedmri simulate``, tiny preset:
64^3 at 3 mm), trains a from-scratch MONAI 3D ResNet on the pooled training
splits with the study-level findings labels, and prints each finding's
in-region AUROC with a 95% patient-bootstrap interval:

- in distribution: the sites' own validation and test patients;
- held out: every series of a hospital whose scanner no site has;
- per sequence, on the held-out hospital (labels are per study, so a mass
  counts as present on a T1 before contrast, where it barely shows).

A finding the ceiling cannot tell from health is a data problem: no
self-supervised recipe will learn it either.

    python benchmarks/bench_ceiling.py --out /tmp/ceiling                    # ~12 min on 2 cores
    python benchmarks/bench_ceiling.py --out /tmp/ceiling --seeds 0 1 2      # one row per seed, and medians
    python benchmarks/bench_ceiling.py --out /tmp/ceiling --series 120 --holdout-series 150 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fedmri.config import load_config
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.simulations.ceiling import CeilingConfig, Split, findings_intervals, load_split, predict, train_ceiling
from fedmri.simulations.runner import holdout_seed, synthesise_site

HOLDOUT_INDEX = 4


def prepare(out: Path, seed: int, sites: int, series: int, holdout_series: int) -> tuple[list[Path], Path]:
    """Synthesise and index the sites and the held-out hospital (complete folders are reused)."""
    from omegaconf import OmegaConf

    cfg = load_config("tiny", overrides=[f"seed={seed}"])
    quiet = lambda s: None  # noqa: E731
    catalogs = [synthesise_site(cfg, out, f"site-{i:02d}", i, seed, quiet, "demo", series).catalog
                for i in range(1, sites + 1)]
    held_cfg = OmegaConf.merge(cfg, {"data": {"catalog": {"split_fractions": [0.0, 1.0, 0.0]}}})
    # The demo's held-out archetype (Canon, a vendor none of the first three sites has), balanced case mix.
    index = max(HOLDOUT_INDEX, sites + 1)
    holdout = synthesise_site(held_cfg, out, "holdout-01", index, holdout_seed(seed, 1), quiet, "demo",
                              holdout_series, case_mix="balanced").catalog
    return catalogs, holdout


def _joined(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.images, b.images]), torch.cat([a.findings, b.findings]), a.regions + b.regions,
                 a.sequences + b.sequences, a.patients + b.patients)


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    out = args.out if args.data_here else args.out / f"seed-{seed}"
    start = time.perf_counter()
    catalogs, holdout = prepare(out, seed, args.sites, args.series, args.holdout_series)
    print(f"seed {seed}: data ready in {time.perf_counter() - start:.0f} s", flush=True)
    cfg = CeilingConfig(network=args.network, epochs=args.epochs, seed=seed, n_boot=args.n_boot)
    train = load_split(catalogs, "train")
    model, losses = train_ceiling(train, cfg, say=lambda s: None)
    print(f"seed {seed}: {cfg.network} on {len(train)} series, {cfg.epochs} epochs, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}", flush=True)
    result: dict = {"seed": seed, "n_train": len(train), "epochs": cfg.epochs}
    for name, split in (("in_distribution", _joined(load_split(catalogs, "val"), load_split(catalogs, "test"))),
                        ("holdout", load_split([holdout], None))):
        overall, by_seq = findings_intervals(predict(model, split), split, cfg.n_boot, seed)
        result[name] = {k: v.to_json() for k, v in overall.items()}
        result[f"{name}_by_sequence"] = {c: {s: v.to_json() for s, v in d.items()} for c, d in by_seq.items()}
        print(f"\n  {name.replace('_', ' ')} ({len(split)} series, {len(set(split.patients))} patients): "
              "in-region AUROC [95% CI by patient]")
        for code, iv in overall.items():
            print(f"    {code:16} {iv.format()}   n={iv.n} series, {iv.clusters} patients")
    print("\n  held out, per sequence (AUROC, n series):")
    for code, seqs in result["holdout_by_sequence"].items():
        print(f"    {code:16} " + "  ".join(f"{s} {v['value']:.2f} ({v['n']})" for s, v in seqs.items()))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the hospitals, catalogs and ceiling.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--series", type=int, default=200, help="series per site")
    ap.add_argument("--holdout-series", type=int, default=160)
    ap.add_argument("--network", default="resnet10")
    ap.add_argument("--epochs", type=int, default=70, help="the ceiling plateaus after ~60 on 2 x 200 series")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--data-here", action="store_true",
                    help="hospitals and catalogs directly under --out (one seed), e.g. to reuse a folder")
    args = ap.parse_args()
    results = [one_seed(args, s) for s in args.seeds]
    if len(results) > 1:
        print("\nmedian over seeds, held out:")
        for code in ["macro", *FINDING_CODES]:
            vals = [r["holdout"][code]["value"] for r in results if code in r["holdout"]]
            if vals:
                print(f"    {code:16} {statistics.median(vals):.3f}  (min {min(vals):.3f}, max {max(vals):.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {args.out / 'ceiling.json'}")


if __name__ == "__main__":
    sys.exit(main())
