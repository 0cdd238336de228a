"""Deployed first-message latency: a real SuperLink and SuperNode on localhost, timed from `fedmri run`.

Each measured run is one coordinator's `fedmri run --stream` of a micro-encoder
federation with one site and one pretrain round of one local step, submitted to
a deployment started as docs/deployment.md starts one (TLS, a registered node
key). Every message makes the SuperNode start a ClientApp process, which imports
torch, Flower and fedmri before it answers, so the figures are:

- ``identity s``: from `fedmri run` starting to the coordinator logging the
  site's answer to its first message (the identity query): submission, the
  ServerApp's start and one ClientApp process start;
- ``round s``: the pretrain round as the coordinator times it (send, the site's
  ClientApp start, one training step, the reply);
- ``run s``: the whole `fedmri run` command, until it exits.

Times of log lines are taken when `fedmri run --stream` prints them, so they
carry the log stream's polling delay (about a second); compare trees measured
in the same run only.

``--tree DIR`` also measures another checkout (e.g. ``git worktree add /tmp/old
<rev>``): every process of its deployment (daemons, Flower's SuperLink,
SuperNode and ClientApp processes) imports that tree's fedmri, through a
``sitecustomize`` that points the installed editable finder at it. Runs
alternate between trees.

    python benchmarks/bench_deploy_latency.py [--tree /tmp/old] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import textwrap
from pathlib import Path

from _deploy import Deployment
from _harness import boot_folder

# The micro preset's overrides, spelled out: older trees measured with --tree lack the preset.
MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "ssl.head_hidden_dim=64",
         "ssl.head_bottleneck_dim=16", "ssl.local_crops_number=2", "align.embed_dim=32", "ssl.warmup_fraction=0"]
PATTERNS = {"identity": r"fedmri: site \d+ is ", "round": r"fedmri: pretrain round 1/1 done in ([\d.]+) s"}


def _site(root: Path) -> Path:
    """One synthetic hospital (12 series), indexed for the micro preset; its catalog."""
    from fedmri.config import load_config
    from fedmri.simulations.runner import synthesise_site

    return synthesise_site(load_config("tiny"), root, "site-01", 1, 0, lambda _: None, "tiny", 12).catalog


def _run(deployment: Deployment, name: str) -> dict[str, float]:
    config = deployment.root / f"{name}.yaml"
    config.write_text(textwrap.dedent(f"""
        name: {name}
        preset: tiny
        overrides: {MICRO}
        min_sites: 1
        wait_for_sites_s: 60
        stages: [{{name: pretrain, rounds: 1, local_steps: 1}}]
    """))
    code, seen, output = deployment.run(config, patterns=PATTERNS)
    if code != 0 or "identity" not in seen or "round" not in seen:
        raise RuntimeError(f"{name} ({deployment.tree or 'this tree'}): exit {code}, found {sorted(seen)}:\n"
                           f"{output[-3000:]}")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="", help="another fedmri checkout to measure too")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree (median reported)")
    args = parser.parse_args()
    trees = ["", *([str(Path(args.tree).resolve())] if args.tree else [])]
    with tempfile.TemporaryDirectory(prefix="fedmri-deploy-") as tmp:
        root = Path(tmp)
        boot = boot_folder(root)
        print("[data] synthesising and indexing one hospital ...", flush=True)
        catalog = _site(root / "data")
        times: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        deployments: dict[str, Deployment] = {}
        try:
            for i, tree in enumerate(trees):
                print(f"[deploy] starting {tree or 'this tree'} ...", flush=True)
                deployments[tree] = Deployment(root / f"tree{i}", [catalog], tree, boot)
            for r in range(args.repeats):
                for i, tree in enumerate(trees):
                    result = _run(deployments[tree], f"latency-{r}")
                    times[tree].append(result)
                    print(f"[run] {tree or 'this tree'} #{r + 1}: identity {result['identity']:.1f} s, round "
                          f"{result['round']:.1f} s, run {result['run']:.1f} s", flush=True)
        finally:
            for deployment in deployments.values():
                deployment.stop()
    print(f"\n{'tree':<28} {'identity s':>11} {'round s':>8} {'run s':>7}   (medians of {args.repeats})")
    for tree in trees:
        med = {k: statistics.median(t[k] for t in times[tree]) for k in ("identity", "round", "run")}
        print(f"{(tree or 'this tree')[-28:]:<28} {med['identity']:>11.1f} {med['round']:>8.1f} {med['run']:>7.1f}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
