"""What a site pays before its first reply: importing the ClientApp, then answering its first messages.

In a deployment every message starts a fresh ClientApp process (Flower 1.42's
SuperNode runs each in its own process), so a site's latency per message is
interpreter start + imports + the handler. Each repeat runs in a new process:

- ``python``: ``python -c pass``;
- ``torch+flwr``: ``import torch, flwr`` (the floor fedmri builds on);
- ``client.app``: ``import fedmri.client.app``;
- ``first query``: the import plus the coordinator's identity query;
- ``first pretrain``: the import plus one pretrain round of one local step (micro encoder, batch 2)
  on a small synthetic site, as the first message of a run.

``--tree DIR`` measures another checkout of fedmri (e.g. ``git worktree add /tmp/old <rev>``) with
this venv's libraries, so a change is compared with its base in the same run::

    python benchmarks/bench_startup.py [--tree /tmp/old] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _harness import boot_folder, tree_env

MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "ssl.head_hidden_dim=64",
         "ssl.head_bottleneck_dim=16", "ssl.local_crops_number=2", "align.embed_dim=32"]

# Starts every child's code; another tree's fedmri comes from its environment (_harness.tree_env).
_BOOT = "import sys, time\nT0 = time.perf_counter()\n"

_CASES = {
    "python": "pass",
    "torch+flwr": "import torch, flwr",
    "client.app": "import fedmri.client.app",
    "first query": """
        from flwr.app import Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        from fedmri.client.app import app
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
        ctx = Context(run_id=1, node_id=7, node_config={{"site-config": {site!r}}}, state=RecordDict(), run_config={{}})
        reply = app(Message(RecordDict(), dst_node_id=7, message_type="query"), ctx)
        assert "versions" in reply.content
    """,
    "first pretrain": """
        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        from omegaconf import OmegaConf
        from fedmri.client.app import app
        from fedmri.config import load_config
        from fedmri import wire
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
        cfg = load_config("tiny", overrides={micro!r})
        down = wire.to_record(wire.select(wire.initial_state(cfg), wire.stage_groups("pretrain", cfg).down))
        config = ConfigRecord({{"stage": "pretrain", "round": 1, "server-round": 1, "local-steps": 1, "seed": 0,
                               "run-name": "startup", "fedmri-config": OmegaConf.to_yaml(cfg), "lr": 1e-4,
                               "weight-decay": 0.04, "teacher-momentum": 0.99, "teacher-temp": 0.04}})
        ctx = Context(run_id=1, node_id=7, node_config={{"site-config": {site!r}}}, state=RecordDict(), run_config={{}})
        reply = app(Message(RecordDict({{"arrays": down, "config": config}}), dst_node_id=7, message_type="train"), ctx)
        assert "arrays" in reply.content, reply.content
    """,
}


def _site(root: Path) -> str:
    """One small synthetic hospital, indexed, and its site file."""
    from omegaconf import OmegaConf

    from fedmri.config import load_config
    from fedmri.simulations.runner import synthesise_site

    catalog = synthesise_site(load_config("tiny"), root, "site-01", 1, 0, lambda _: None, "tiny", 8).catalog
    site = root / "site.yaml"
    site.write_text(OmegaConf.to_yaml(OmegaConf.create({"name": "site-01", "catalog": str(catalog),
                                                        "threads": 1, "batch_size": 2})))
    return str(site)


def _run(case: str, tree: str, site: str, boot: Path) -> float:
    body = textwrap.dedent(_CASES[case].format(site=site, micro=MICRO))
    code = _BOOT + body + "\nprint('T', time.perf_counter() - T0)\n"
    env = os.environ | (tree_env(tree, boot) if tree else {})
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{case} failed in {tree or 'the installed tree'}:\n{out.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="another fedmri checkout to measure too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the medians as JSON")
    args = parser.parse_args()
    trees = ["", *[str(Path(t).resolve()) for t in args.tree]]
    with tempfile.TemporaryDirectory(prefix="fedmri-startup-") as tmp:
        site, boot = _site(Path(tmp)), boot_folder(Path(tmp))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):  # interleaved, so load drifts hit every case alike
            for tree in trees:
                for case in _CASES:
                    times.setdefault((tree, case), []).append(_run(case, tree, site, boot))
    medians = {f"{tree or 'this tree'} | {case}": statistics.median(v) for (tree, case), v in times.items()}
    print(f"median of {args.repeats} fresh processes each, seconds of wall time (2-core machine: noisy)\n")
    print(f"{'tree':<24} {'case':<16} {'median s':>9} {'- torch+flwr':>13}")
    for tree in trees:
        floor = statistics.median(times[(tree, "torch+flwr")])
        for case in _CASES:
            m = statistics.median(times[(tree, case)])
            extra = f"{m - floor:+.2f}" if case not in ("python", "torch+flwr") else ""
            print(f"{(tree or 'this tree')[-24:]:<24} {case:<16} {m:>9.2f} {extra:>13}")
    if args.out:
        args.out.write_text(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
