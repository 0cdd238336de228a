"""Which training signal puts disease into the tiny ViT's frozen features? (issue 15, the recipe)

Trains the tiny ViT3D encoder centrally (no federation: this asks what the
objective can learn at all, the federated cost comes on top) on the pooled
training series of the hospitals that ``bench_ceiling.py`` synthesises, with
one of three signals, and at checkpoints probes the frozen features with a
logistic regression per finding (fitted on the training series) scored on the
held-out hospital (in-region AUROC, macro over findings, 95% interval by
patient). The probe reads the CLS token, the mean or the max of the patch
tokens, or all three:

- ``ssl``: DINOv2 + iBOT + KoLeo on multi-crops, as the pretrain stage;
- ``align``: CLIP alignment with the series' reports (frozen MiniLM), as the
  align stage, optionally with flips/shifts (``--augment``), batches of one
  body region (``--same-region``: only what differs within a region, such as
  disease, tells the reports apart) or reports cut to their impression
  (``align.max_tokens=16``);
- ``supervised``: the same ViT trained with the findings labels (BCE), the
  ViT's own ceiling, to set beside the CNN ceiling of ``bench_ceiling.py``.

    python benchmarks/bench_ceiling.py --out /tmp/probe --sites 6 --data-here --epochs 1   # the data (~10 min)
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 ssl --steps 1500 --every 500
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 align --steps 6000 --every 2000 --augment --same-region
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 supervised --epochs 40
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 supervised --epochs 40 model.patch_size=8
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 supervised --epochs 40 --conv-stem
    python benchmarks/bench_probe.py --data /tmp/probe --sites 6 ssl --steps 1500 --every 500 model.stem=conv
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedmri.config import load_config
from fedmri.simulations.ceiling import Split, findings_intervals, load_split

POOLS = ("cls", "mean", "max", "cls+mean+max")


def features(encoder: torch.nn.Module, split: Split, batch_size: int = 16) -> dict[str, np.ndarray]:
    """CLS, mean and max of the patch tokens of every series, in eval mode."""
    was = encoder.training
    encoder.eval()
    out: dict[str, list[torch.Tensor]] = {"cls": [], "mean": [], "max": []}
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            o = encoder(split.images[i:i + batch_size])
            patch = o["patch"].float()
            out["cls"].append(o["cls"].float())
            out["mean"].append(patch.mean(1))
            out["max"].append(patch.amax(1))
    encoder.train(was)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def probe(encoder: torch.nn.Module, train: Split, held: Split, label: str, n_boot: int = 300) -> dict[str, float]:
    """Logistic probe per finding on frozen features; prints and returns each pooling's held-out macro AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ftr, fho = features(encoder, train), features(encoder, held)
    macros = {}
    for pool in POOLS:
        parts = pool.split("+")
        xtr = np.concatenate([ftr[p] for p in parts], 1)
        xho = np.concatenate([fho[p] for p in parts], 1)
        scaler = StandardScaler().fit(xtr)
        xtr, xho = scaler.transform(xtr), scaler.transform(xho)
        scores = np.zeros((len(held), train.findings.shape[1]))
        for j in range(scores.shape[1]):
            y = train.findings[:, j].numpy()
            if y.min() != y.max():
                scores[:, j] = LogisticRegression(C=0.1, max_iter=3000).fit(xtr, y).decision_function(xho)
        overall, _ = findings_intervals(scores, held, n_boot)
        macros[pool] = overall["macro"].value
        print(f"  {label:>12} {pool:13} " + " ".join(f"{k} {v.value:.2f}" for k, v in overall.items())
              + f"   macro CI [{overall['macro'].low:.2f}, {overall['macro'].high:.2f}]", flush=True)
    return macros


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    for d in (2, 3, 4):
        if rng.random() < 0.5:
            x = x.flip(d)
    return torch.roll(x, [int(v) for v in rng.integers(-4, 5, 3)], dims=(2, 3, 4))


def train_ssl(cfg, train: Split, steps: int, every: int, check: Callable[[int, torch.nn.Module], None]) -> None:
    from fedmri.ssl import SSLMetaArch, build_mask_generator, build_multicrop, collate_multicrop, ssl_schedule

    rng = np.random.default_rng(0)
    meta = SSLMetaArch(cfg).train()
    opt = torch.optim.AdamW(meta.param_groups(cfg.ssl.patch_embed_lr_mult))
    for g in opt.param_groups:
        g["lr"] = cfg.ssl.lr * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = cfg.ssl.weight_decay * g.get("wd_multiplier", 1.0)
    augment, masker, s = build_multicrop(cfg), build_mask_generator(cfg), cfg.ssl
    teacher_temp = ssl_schedule(cfg, 1.0)["teacher_temp"]
    check(0, meta.teacher["backbone"])
    for step in range(1, steps + 1):
        idx = rng.choice(len(train), 8, replace=False)
        crops = [augment.set_random_state(seed=int(rng.integers(2**31)))(train.images[i]) for i in idx]
        batch = collate_multicrop(crops, masker, s.mask_sample_probability, s.mask_ratio_min_max, rng)
        loss = sum(meta(batch, batch["masks"], teacher_temp).values())
        opt.zero_grad()
        loss.backward()
        if s.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in meta.student.parameters() if p.requires_grad], s.clip_grad)
        opt.step()
        meta.update_teacher(s.momentum_teacher)
        if step % every == 0:
            print(f"  step {step}: loss {float(loss.detach()):.3f}", flush=True)
            check(step, meta.teacher["backbone"])


def train_align(cfg, catalogs: list[Path], steps: int, every: int, augment: bool, same_region: bool,
                check: Callable[[int, torch.nn.Module], None]) -> None:
    from fedmri.align import build_align_objective
    from fedmri.client.trainers.align import build_site_aligned_model, encode_reports, report_pairs
    from fedmri.client.trainers.data import PooledDataset
    from fedmri.client.trainers.optim import decay_groups, set_rates
    from fedmri.data.dataset import SeriesDataset

    rng = np.random.default_rng(0)
    dataset = PooledDataset([SeriesDataset(c, "train") for c in catalogs])
    reports, owner = report_pairs(dataset)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    series_of = [[i for i, r in enumerate(owner) if r == u] for u in range(len(reports))]
    by_region: dict[str, list[int]] = {}
    for unit, members in enumerate(series_of):
        if members:
            by_region.setdefault(dataset.rows[members[0]]["meta"]["body_region"], []).append(unit)
    regions = [r for r, units in by_region.items() if len(units) >= 4]
    model = build_site_aligned_model(cfg)
    objective = build_align_objective(cfg)
    pooled = encode_reports(model, reports, torch.device("cpu"))
    opt = torch.optim.AdamW(decay_groups(model.named_parameters()))
    set_rates(opt, cfg.align.lr, cfg.align.weight_decay)
    print(f"  {len(dataset)} series, {len(reports)} reports", flush=True)
    check(0, model.image_encoder)
    for step in range(1, steps + 1):
        pool = by_region[regions[int(rng.integers(len(regions)))]] if same_region else range(len(reports))
        units = rng.choice(list(pool), min(16, len(pool)), replace=False)
        x = images[[int(rng.choice(series_of[u])) for u in units]]
        out = model(_augment(x, rng) if augment else x, text_pooled=pooled[units])
        loss = sum(objective(out).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            print(f"  step {step}: loss {float(loss.detach()):.3f}", flush=True)
            check(step, model.image_encoder)


def train_supervised(cfg, train: Split, held: Split, epochs: int, stem: bool,
                     check: Callable[[int, torch.nn.Module], None]) -> None:
    from fedmri.models import build_encoder

    rng = np.random.default_rng(0)
    # model.stem=conv: 3^3 stride-2 convolutions under the patch tokens (fedmri.models.layers.PatchEmbed3D).
    encoder = build_encoder(OmegaConf.merge(cfg, {"model": {"stem": "conv"}}) if stem else cfg)
    width = 2 * cfg.model.embed_dim
    head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, train.findings.shape[1]))
    batch = 16
    steps = epochs * (len(train) // batch)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps)
    prevalence = train.findings.mean(0).clamp(min=1e-3)
    pos_weight = ((1 - prevalence) / prevalence).sqrt()

    def logits(x: torch.Tensor) -> torch.Tensor:
        o = encoder(x)
        return head(torch.cat([o["cls"], o["patch"].amax(1)], 1))

    check(0, encoder)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.binary_cross_entropy_with_logits(logits(_augment(train.images[idx], rng)), train.findings[idx],
                                                      pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 0 or epoch == epochs:
            encoder.eval()
            with torch.no_grad():
                scores = torch.cat([logits(held.images[i:i + 32]) for i in range(0, len(held), 32)]).numpy()
            encoder.train()
            overall, _ = findings_intervals(scores, held, 300)
            print(f"  epoch {epoch}: loss {float(loss.detach()):.3f}; its own head on the held-out hospital: "
                  + " ".join(f"{k} {v.value:.2f}" for k, v in overall.items()), flush=True)
            check(epoch, encoder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a bench_ceiling.py --data-here folder")
    ap.add_argument("--sites", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="signal", required=True)
    for name in ("ssl", "align"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=1500)
        p.add_argument("--every", type=int, default=500)
        if name == "align":
            p.add_argument("--augment", action="store_true")
            p.add_argument("--same-region", action="store_true")
        p.add_argument("overrides", nargs="*", help="config overrides of the tiny preset")
    p = sub.add_parser("supervised")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--conv-stem", action="store_true", help="convolutional stem under the patch tokens")
    p.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=args.overrides)
    catalogs = [args.data / "catalogs" / f"site-{i:02d}" for i in range(1, args.sites + 1)]
    train, held = load_split(catalogs, "train"), load_split([args.data / "catalogs" / "holdout-01"], None)
    print(f"{args.signal}: {len(train)} training series, held-out hospital {len(held)} series of "
          f"{len(set(held.patients))} patients; overrides {args.overrides}", flush=True)
    start = time.perf_counter()

    def check(step: int, encoder: torch.nn.Module) -> None:
        probe(encoder, train, held, f"{step} ({time.perf_counter() - start:.0f} s)")

    if args.signal == "ssl":
        train_ssl(cfg, train, args.steps, args.every, check)
    elif args.signal == "align":
        train_align(cfg, catalogs, args.steps, args.every, args.augment, args.same_region, check)
    else:
        train_supervised(cfg, train, held, args.epochs, args.conv_stem, check)


if __name__ == "__main__":
    main()
