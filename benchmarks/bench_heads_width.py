"""What the heads' widths cost in quality: the demo's heads stage at several ``heads.hidden_dim`` (and trunks).

Issue 18 asks a heads round to send at most 1% of the encoder's bytes to a site
that holds the encoder. At ``base`` five separate MLP heads at ``hidden_dim``
256 are 8.0 MB, 2.25% of the encoder's 354 MB (64: 0.58%, 0, a linear probe:
0.07%); behind a shared trunk of 256 (``heads.trunk_dim``, the default since
2026-12-07) they are 2.9 MB, 0.83%. This measures what a narrower head or a
trunk costs, on a finished ``fedmri simulate`` run: its aligned encoder (the
run's last checkpoint), the demo's heads stage replayed for each width (FedAvg
over the sites, weighted by examples, the run's rounds and local steps), then
every head scored on the held-out hospital with the 95% interval over its
patients. The trunk is the run config's unless an override sets it (a run from
before the trunk has none). Figures only, never asserted.

    .venv/bin/python benchmarks/bench_heads_width.py --run runs/demo/federated            # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_heads_width.py --run runs/demo/federated --widths 256 0 --seeds 0 1 2
    .venv/bin/python benchmarks/bench_heads_width.py --run runs/demo/federated --widths 256 --local-steps 100 -- heads.trunk_dim=0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HEADLINE = ["findings_auroc_macro", "findings_auroc_in_region_macro", "sequence_accuracy", "body_region_accuracy",
            "age_mae", "sex_auroc"]
MLP = ["findings", "sequence", "body_region", "age", "sex"]


def replay(run: Path, data: Path, sites: list[str], holdout: str, width: int, seed: int,
           local_steps: int | None = None, overrides: list[str] | None = None) -> dict[str, float]:
    """The run's heads stage at ``heads.hidden_dim = width``, scored on ``holdout``."""
    import torch
    from omegaconf import OmegaConf

    from fedmri.client.site import load_site
    from fedmri.client.trainers import TrainRequest
    from fedmri.client.trainers.heads import evaluate_heads, run_heads
    from fedmri.config import to_yaml
    from fedmri.heads.mlp import trunk_dim
    from fedmri.server.checkpoint import load_checkpoint
    from fedmri.wire import initial_state

    cfg = OmegaConf.load(run / "config.yaml")
    cfg = OmegaConf.merge(cfg, {"seed": seed, "heads": {"hidden_dim": width, "tasks": MLP,
                                                        "cache_dir": tempfile.mkdtemp(prefix="bench-width-")}},
                         OmegaConf.from_dotlist(list(overrides or [])))
    stage = next(s for s in OmegaConf.load(run / "federation.yaml").stages if s.name == "heads")
    loaded = load_checkpoint(run / "ckpt")
    if loaded is None:
        sys.exit(f"{run}/ckpt has no checkpoint: pass a finished simulate run's mode folder")
    torch.manual_seed(seed)
    fresh = initial_state(cfg)
    state = {k: v for k, v in loaded[0].items() if k.startswith("encoder/")}
    state |= {k: v for k, v in fresh.items() if k.startswith("head")}
    head_bytes = 4 * sum(v.numel() for k, v in state.items() if k.startswith("head"))
    t = time.perf_counter()
    for r in range(1, int(stage.rounds) + 1):
        request = TrainRequest.from_config({"stage": "heads", "round": r, "server-round": r, "seed": seed,
                                            "run-name": f"width{width}", "fedmri-config": to_yaml(cfg),
                                            "local-steps": int(local_steps or stage.local_steps), "lr": float(cfg.heads.lr),
                                            "weight-decay": float(cfg.heads.weight_decay)})
        ups = [run_heads(load_site(data / f"{s}.yaml"), cfg, state, request) for s in sites]
        total = sum(m["num-examples"] for _, m in ups)
        state = state | {k: sum(up[k] * (m["num-examples"] / total) for up, m in ups) for k in ups[0][0]}
    train_s = time.perf_counter() - t
    scores = evaluate_heads(load_site(data / f"{holdout}.yaml"), cfg, state, "val")
    out = {"width": width, "trunk": trunk_dim(cfg), "seed": seed, "overrides": list(overrides or []),
           "local_steps": int(local_steps or stage.local_steps), "head_kb": round(head_bytes / 1e3, 1),
           "train_s": round(train_s, 1), "patients": scores.get("heads-patients")}
    for m in HEADLINE:
        if m in scores:
            out[m] = round(scores[m], 3)
            if f"{m}_ci_low" in scores:
                out[f"{m}_ci"] = [round(scores[f"{m}_ci_low"], 3), round(scores[f"{m}_ci_high"], 3)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo/federated"),
                        help="a finished simulate run's mode folder (config.yaml, federation.yaml, ckpt/)")
    parser.add_argument("--data", type=Path, default=None, help="its data folder (default: <run>/../data)")
    parser.add_argument("--sites", nargs="+", default=["site-01", "site-02", "site-03"])
    parser.add_argument("--holdout", default="holdout-01")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 128, 64, 0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--local-steps", type=int, default=None, help="per heads round (default: the run's)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. heads.pooling=cls")
    args = parser.parse_args()
    data = args.data or args.run.parent / "data"
    for name in [*args.sites, args.holdout]:
        if not (data / f"{name}.yaml").is_file():
            sys.exit(f"{data} has no {name}.yaml; run `fedmri simulate` first or pass --data")
    import torch

    torch.set_num_threads(2)
    for seed in args.seeds:
        for width in args.widths:
            print(json.dumps(replay(args.run, data, args.sites, args.holdout, width, seed, args.local_steps, args.overrides)), flush=True)


if __name__ == "__main__":
    main()
