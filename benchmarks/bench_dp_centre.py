"""Does DP pretraining collapse on the demo? The teacher's prototype use with a frozen and a DP centre (issue 19).

Runs ``fedmri simulate --mode federated`` on the demo's three hospitals,
pretraining only (3 rounds x 20 local steps), for each variant and seed:

- ``no-dp``: plain pretraining, the centre an EMA of every batch (the reference);
- ``no-dp-no-koleo``: the same with KoLeo off, as DP-SGD must have it (KoLeo
  couples the batch): what the DP variants could reach at best;
- ``frozen``: DP-SGD (target ε 6 per site), the centres fixed for the round, so
  they stay at their initial zero for the whole run (fedmri before the DP centre);
- ``dp-centre``: DP-SGD with the DP centre (``ssl.dp_center``): each series'
  teacher means are clipped with its gradient in one norm budget and released by
  the same Gaussian mechanism, so the centre moves at no extra ε;
- ``dp-public``: the DP centre, and KoLeo on public series (``ssl.dp_public_koleo``):
  each site's ``public_catalog`` is a fourth synthetic hospital from a seed of its
  own (no site's patients), whose KoLeo gradient is added after the noise at no ε.

Then it reads the final teacher from the run's checkpoint and measures, on two
global crops of every validation and test series of the three sites (the
probe), what the SSL behaviour tests measure (tests/common/ssl/test_ssl_training.py),
all as fractions of log K:

- ``entropy``: the mean per-crop entropy of the teacher's targets (1: uniform);
- ``entropy_of_mean``: the entropy of the probe's mean target (0: every crop on
  one prototype, the collapse; the behaviour tests ask for > 0.1);
- ``information``: the mutual information between crop and prototype, in nats
  (0: every crop gets the same distribution, however peaked);
- ``prototypes``: how many prototypes are some crop's argmax.

    python benchmarks/bench_dp_centre.py --seeds 0 1 2 --out /tmp/dp-centre   # ~2 min per run on 2 cores

The demo's hospitals are those of ``make demo`` (``runs/demo/data``); the
script synthesises them first when they are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# name -> (DP-SGD or not, run-config overrides)
VARIANTS = {
    "no-dp": (False, []),
    "no-dp-no-koleo": (False, ["ssl.koleo_loss_weight=0"]),
    "frozen": (True, ["ssl.dp_center.enabled=false"]),
    "dp-centre": (True, ["ssl.dp_center.enabled=true"]),
    "dp-public": (True, ["ssl.dp_center.enabled=true", "ssl.dp_public_koleo.enabled=true"]),
}
PUBLIC_SEED = 7919  # the public hospital's: no site of the demo (seed 0) has its patients
SITES = ("site-01", "site-02", "site-03")
METRICS = ("entropy", "entropy_of_mean", "information", "prototypes", "dino_loss")


def stages(dp: bool, noise: float | None = None) -> str:
    mechanism = f"noise_multiplier: {noise}" if noise is not None else "target_epsilon: 6"
    dp_part = f", dp: {{enabled: true, {mechanism}}}" if dp else ""
    return f"federation.stages=[{{name: pretrain, rounds: 3, local_steps: 20{dp_part}}}]"


def ensure_demo_data(data: Path) -> None:
    if all((data / "catalogs" / s / "catalog.sqlite").is_file() for s in SITES):
        return
    from fedmri.simulations.runner import load_simulation, prepare_sites

    print(f"synthesising the demo's hospitals into {data} ...", flush=True)
    prepare_sites(load_simulation(None, [f"data_dir={data}", "holdout_sites=0"]), data)


def ensure_public_data(data: Path) -> Path:
    """A hospital of "public" series (another seed, so no site's patients): its catalog."""
    public = data.parent / "public-data"
    catalog = public / "catalogs" / "site-01"
    if not (catalog / "catalog.sqlite").is_file():
        from fedmri.simulations.runner import load_simulation, prepare_sites

        print(f"synthesising a public hospital into {public} ...", flush=True)
        prepare_sites(load_simulation(None, [f"data_dir={public}", "holdout_sites=0", "sites=1",
                                             "federation.min_sites=1", f"federation.seed={PUBLIC_SEED}"]), public)
    return catalog


def run(name: str, seed: int, out: Path, data: Path, overrides: list[str], dp: bool, reuse: bool,
        noise: float | None = None, public: Path | None = None) -> Path:
    folder = out / name / "federated"
    if reuse and (folder / "ckpt" / "LATEST").is_file():
        return folder
    catalogs = ",".join(str(data / "catalogs" / s) for s in SITES)
    run_overrides = "[" + ",".join(overrides) + "]"
    cmd = [sys.executable, "-m", "fedmri.cli", "simulate", "--mode", "federated", f"federation.name={name}",
           f"federation.seed={seed}", f"federation.run_root={out}", f"catalogs=[{catalogs}]",
           f"federation.overrides={run_overrides}", stages(dp, noise)]
    if public is not None:
        cmd.append(f"site_overrides=['public_catalog={public}']")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    # A round the sites declined trained nothing: its probe would measure the initial model.
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    declined = [r for r in rows if r["site"] != "all" and r["status"] != "ok"]
    if declined:
        raise SystemExit(f"{name}: {len(declined)} site rounds did not train, e.g. {declined[0]['site']}: "
                         f"{declined[0].get('reason', '')}; rerun with another --tag")
    return folder


def probe_volumes(data: Path) -> list[torch.Tensor]:
    from fedmri.data.dataset import SeriesDataset

    volumes = []
    for site in SITES:
        for split in ("val", "test"):
            volumes += [s["image"] for s in SeriesDataset(data / "catalogs" / site, split=split)]
    return volumes


def diagnostics(folder: Path, volumes: list[torch.Tensor]) -> dict[str, float]:
    from safetensors.torch import load_file

    from fedmri.client.trainers.pretrain import build_ssl_model
    from fedmri.config import load_config
    from fedmri.ssl import build_multicrop, collate_multicrop, ssl_schedule
    from fedmri.wire import select, stage_groups

    cfg = load_config(str(folder / "config.yaml"))
    latest = (folder / "ckpt" / "LATEST").read_text().strip()
    state = load_file(str(folder / "ckpt" / latest / "global.safetensors"))
    meta = build_ssl_model(cfg, select(state, stage_groups("pretrain", cfg).down), "pretrain").eval()
    augment = build_multicrop(cfg).set_random_state(0)
    crops = collate_multicrop([augment(v) for v in volumes])["global_crops"]
    temp = ssl_schedule(cfg, 1.0)["teacher_temp"]
    k = int(cfg.ssl.head_n_prototypes)
    with torch.no_grad():
        logits = meta.teacher["dino_head"](meta.teacher["backbone"](crops)["cls"])
        p = meta.dino_loss.teacher_targets(logits, temp)
        mean_p = p.mean(0)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        entropy_of_mean = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        info = (p * (p.clamp_min(1e-12).log() - mean_p.clamp_min(1e-12).log())).sum(-1).mean()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if r.get("site") == "all" and r.get("stage") == "pretrain" and "dino_loss" in r]
    dino = last[-1]["dino_loss"] if last else math.nan
    return {"entropy": float(entropy) / math.log(k), "entropy_of_mean": float(entropy_of_mean) / math.log(k),
            "information": float(info), "prototypes": float(len(set(p.argmax(-1).tolist()))),
            "dino_loss": float(dino), "probe_crops": float(len(crops))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["no-dp", "no-dp-no-koleo", "frozen", "dp-centre"],
                        choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/dp-centre"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="the demo's hospitals")
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of rerunning them")
    parser.add_argument("--noise", type=float, default=None,
                        help="a fixed noise multiplier instead of target ε 6 (a smaller σ stands for a larger site "
                             "at the same ε)")
    parser.add_argument("--set", nargs="*", default=[], help="run-config overrides added to every DP variant")
    parser.add_argument("--tag", default="", help="added to every run name: the sites' ledgers refuse a DP run "
                        "name spent before on other weights")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ensure_demo_data(args.data.resolve())
    volumes = probe_volumes(args.data.resolve())
    public = ensure_public_data(args.data.resolve()) if "dp-public" in args.variants else None
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            dp, overrides = VARIANTS[variant]
            # A site's ledger refuses a run name it has spent on other numbers: one name per setting.
            tag = f"-n{args.noise}" if dp and args.noise is not None else ""
            if dp and (overrides or args.set):
                tag += "-" + hashlib.sha1("|".join(overrides + args.set).encode()).hexdigest()[:6]
            folder = run(f"{variant}{tag}{args.tag}-s{seed}", seed, args.out.resolve(), args.data.resolve(),
                         overrides + (args.set if dp else []), dp, args.reuse, args.noise if dp else None,
                         public if variant == "dp-public" else None)
            results[variant].append(diagnostics(folder, volumes))
    print(f"\nprobe: {len(volumes)} validation and test series of {len(SITES)} sites, 2 global crops each\n")
    print(f"{'variant':10} {'seed':>4} " + " ".join(f"{m:>16}" for m in METRICS))
    for variant, rows in results.items():
        for seed, row in zip(args.seeds, rows):
            print(f"{variant:10} {seed:>4} " + " ".join(f"{row[m]:16.3f}" for m in METRICS))
    for variant, rows in results.items():
        print(f"{'median ' + variant:15} " + " ".join(f"{statistics.median(r[m] for r in rows):16.3f}"
                                                      for m in METRICS))


if __name__ == "__main__":
    main()
