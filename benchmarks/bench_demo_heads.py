"""What the lesion heads cost the demo: one heads round and one held-out evaluation, with and without them.

On the data of a `fedmri simulate` run (default ``runs/demo/data``, the demo's
3 x 48 series and a 150-series held-out hospital), on one thread as each
virtual site trains: one heads round of the demo's 20 local steps of batch 4
on one site's training split (round 1 fills the feature cache, round 2 reads
it), then the heads' evaluation of that site's validation split and of every
series of the held-out hospital. Variants: the MLP tasks alone, and with
``segmentation`` and ``anomaly`` at a UNETR ``seg_feature_size`` of 4, 8 and 16.
The encoder is randomly initialised: the decoder's cost does not depend on
what the encoder knows. Figures only, never asserted.

    .venv/bin/python benchmarks/bench_demo_heads.py                    # ~6 min on 2 cores
    .venv/bin/python benchmarks/bench_demo_heads.py --variants mlp dense4

Measured on the 2-core machine with a CPU-heavy job beside it (s; per site
round; evaluation of the 150 held-out series): MLP 0.3 and 2-3; fs 4 11 and
10; fs 8 15-17 and 20; fs 16 48-60 and 36. The demo trains heads about 20
site-rounds long on its critical path (federated and random: 2 rounds of 3
sites on 2 cores; local: 3 sites x 2 rounds one after another; central: 2
rounds of 3x the steps) and scores the held-out hospital 6 times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

MLP = ["findings", "sequence", "body_region", "age", "sex"]


def _variant(name: str) -> list[str]:
    """Run-config overrides of a variant: ``mlp`` or ``dense<seg_feature_size>``."""
    if name == "mlp":
        return [f"heads.tasks=[{','.join(MLP)}]"]
    if not name.startswith("dense") or not name[5:].isdigit():
        raise SystemExit(f"unknown variant {name!r}: mlp or dense<seg_feature_size>, e.g. dense8")
    return [f"heads.tasks=[{','.join(MLP + ['segmentation', 'anomaly'])}]", f"heads.seg_feature_size={name[5:]}"]


def measure(data: Path, site: str, holdout: str, overrides: list[str]) -> dict[str, float]:
    """Seconds of two heads rounds and of the evaluations, and the dense figures (keys as the evaluate stage's)."""
    import torch
    from omegaconf import OmegaConf

    from fedmri.client.site import load_site
    from fedmri.client.trainers import TrainRequest
    from fedmri.client.trainers.heads import evaluate_heads, run_heads
    from fedmri.config import to_yaml
    from fedmri.server.config import FederationConfig, run_config
    from fedmri.wire import initial_state

    torch.set_num_threads(1)
    fed = OmegaConf.structured(FederationConfig)
    fed.overrides = overrides
    cfg = OmegaConf.merge(run_config(fed), {"heads": {"cache_dir": tempfile.mkdtemp(prefix="bench-heads-")}})
    state = initial_state(cfg)
    request = TrainRequest.from_config({"stage": "heads", "round": 1, "server-round": 1, "seed": 0, "run-name": "b",
                                        "fedmri-config": to_yaml(cfg), "local-steps": 20, "lr": float(cfg.heads.lr),
                                        "weight-decay": float(cfg.heads.weight_decay)})
    out: dict[str, float] = {}
    train = load_site(data / f"{site}.yaml")
    for r in (1, 2):
        t = time.perf_counter()
        up, _ = run_heads(train, cfg, state, request)
        out[f"round{r}_s"] = round(time.perf_counter() - t, 1)
    state = state | up
    for name in (site, holdout):
        t = time.perf_counter()
        scores = evaluate_heads(load_site(data / f"{name}.yaml"), cfg, state, "val")
        out[f"eval_{name}_s"] = round(time.perf_counter() - t, 1)
        out |= {f"{name}/{k}": round(v, 3) for k, v in scores.items()
                if k.startswith(("segmentation_dice", "anomaly_miou", "dense-", "lesion-free"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="a simulate run's data folder")
    parser.add_argument("--site", default="site-01")
    parser.add_argument("--holdout", default="holdout-01")
    parser.add_argument("--variants", nargs="+", default=["mlp", "dense4", "dense8", "dense16"])
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides onto every variant, e.g. heads.seg_layers=[0,1,2]")
    args = parser.parse_args()
    if not (args.data / f"{args.site}.yaml").is_file() or not (args.data / f"{args.holdout}.yaml").is_file():
        sys.exit(f"{args.data} has no {args.site}.yaml and {args.holdout}.yaml; run `fedmri simulate` first "
                 "(or pass --data <run_root>/<name>/data)")
    for name in args.variants:
        print(name, json.dumps(measure(args.data, args.site, args.holdout, _variant(name) + args.override)),
              flush=True)


if __name__ == "__main__":
    main()
