"""Time for a decoder on the frozen encoder to reach a from-scratch U-Net's Dice, as a ratio.

Decipher-MR (Yang et al. 2026) reports tuning on its frozen encoder up to 35x
faster than training a segmentation model from scratch. Here, on synthetic
hospitals (lesion masks, lesion classes merged into one foreground):

1. the baseline, MONAI's U-Net (or DynUNet, nnU-Net-like) from scratch with
   Dice + CE and AdamW, sets the target: 95% of its best Dice on the
   evaluation volumes; T_base = its training seconds to first reach it;
2. UNETR decoders (:mod:`fedmri.heads.segmentation`, the heads' settings)
   train on tokens the frozen encoder computed once: by default on tokens
   only (``--decoders noskip``); ``skip`` adds the heads' default decoder,
   with the full-resolution image skip, at 10x the U-Net's FLOPs per step;
   ``--random`` adds a tokens-only decoder on a randomly initialised encoder;
   ``light2``, ``light4`` (``light1``) add the heads' light decoder
   (:class:`fedmri.heads.LightDecoder`: every token map and the image fused
   once at 1/2, 1/4 (1/1) of the image's resolution; 0.75x, 0.09x (6x) the
   U-Net's FLOPs per step).
   T_head = a decoder's seconds to first reach the same target, without and
   with the one-time token extraction of the training volumes.
3. label efficiency: ``--label-fraction 0.1`` trains every model on the same
   seeded 10% of the training masks and compares the best Dice each reaches.

All models train side by side, one step each in turn, each on its own clock,
on the same batches (:func:`fedmri.simulations.seg_baseline.train_side_by_side`);
scoring (Dice and HD95 from :mod:`fedmri.metrics`) is not timed. Training =
every site's catalog ``train`` split, evaluation = ``val`` + ``test`` (a
patient is in one or the other), series with a mask only. The encoder is
``--encoder`` (a `fedmri export` folder) or pretrained here by the sites' local
pretraining (``run_pretrain``: DINO + iBOT + KoLeo) on the pooled ``train``
splits, every series, for ``--pretrain-steps`` steps; that is not timed either.

    python benchmarks/bench_segmentation.py            # ~10 min on 2 cores, + ~5 min to synthesise once
    python benchmarks/bench_segmentation.py --quick    # smoke run, ~2 min once the data exist
    python benchmarks/bench_segmentation.py --budget-s 360 --decoders noskip,skip --random
    python benchmarks/bench_segmentation.py --budget-s 600 --decoders light2,light4 --label-fraction 0.1

Prints the curves and a table; nothing is asserted (docs/architecture.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# libgomp reads it once, when torch loads it; spinning threads stall on a shared 2-core machine (see bench_dp.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGET_FRACTION = 0.95  # of the baseline's best Dice: its plateau, not its luckiest scoring
MIN_GAIN = 0.005  # Dice that counts as a gain (plateau detection, "did it learn at all")
DECODERS = ("noskip", "skip", "light1", "light2", "light4")


def label_subset(train: Any, fraction: float, batch_size: int, seed: int) -> Any:
    """A seeded random ``fraction`` of the training volumes (at least a batch): every model gets the same ones."""
    from fedmri.simulations.seg_baseline import SegSet

    if not 0 < fraction <= 1:
        raise SystemExit(f"--label-fraction must be in (0, 1], got {fraction}")
    keep = max(batch_size, round(fraction * len(train)))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:keep].sort().values
    print(f"[data] label efficiency: {keep} of {len(train)} training volumes ({fraction:.0%} of the masks)")
    return SegSet([train.ids[i] for i in idx], train.images[idx], train.labels[idx])


def prepare_catalogs(args: argparse.Namespace) -> tuple[Any, list[Path]]:
    """Synthesise and index the hospitals as `fedmri simulate` does; complete folders are reused."""
    from fedmri.config import load_config
    from fedmri.simulations.runner import synthesise_site

    cfg = load_config(args.preset, overrides=[f"seed={args.seed}", *args.override])  # as simulate's run_config
    sites = [synthesise_site(cfg, args.data_dir, f"site-{i:02d}", i, args.seed, print, "demo", args.series_per_site)
             for i in range(1, args.sites + 1)]
    return cfg, [site.catalog for site in sites]


def pretrain_encoder(cfg: Any, catalogs: list[Path], steps: int, seed: int, workdir: Path) -> tuple[nn.Module, dict]:
    """``run_pretrain`` for ``steps`` local steps on the pooled train splits, as one site of a federation."""
    from omegaconf import OmegaConf

    from fedmri.client.site import load_site
    from fedmri.client.trainers import TrainRequest
    from fedmri.client.trainers.pretrain import run_pretrain
    from fedmri.models import build_encoder
    from fedmri.ssl import ssl_schedule
    from fedmri.wire import ENCODER, SEP, initial_state, select, stage_groups

    site_file = workdir / "pooled-site.yaml"
    site_file.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "name": "pooled", "catalog": str(catalogs[0]), "extra_catalogs": [str(c) for c in catalogs[1:]],
        "threads": torch.get_num_threads(), "batch_size": 4, "policy": {"max_local_steps": steps}})))
    s = ssl_schedule(cfg, 0.5)  # one round: the schedule's middle, as the coordinator would send it
    request = TrainRequest.from_config({
        "stage": "pretrain", "round": 1, "server-round": 1, "local-steps": steps, "seed": seed,
        "run-name": "bench-segmentation", "fedmri-config": OmegaConf.to_yaml(cfg), "lr": s["lr"],
        "weight-decay": s["weight_decay"], "teacher-momentum": s["teacher_momentum"],
        "teacher-temp": s["teacher_temp"]})
    down = select(initial_state(cfg), stage_groups("pretrain", cfg).down)
    up, metrics = run_pretrain(load_site(site_file), cfg, down, request)
    encoder = build_encoder(cfg.model)
    encoder.load_state_dict({k[len(ENCODER + SEP):]: v for k, v in select(up, [ENCODER]).items()})
    return encoder, metrics


def exported_encoder(path: Path, cfg: Any) -> nn.Module:
    """The image encoder of a `fedmri export` folder, checked against the run's model sizes."""
    from omegaconf import OmegaConf

    from fedmri.errors import ConfigError
    from fedmri.export import load_encoder, read_export_config

    wanted, found = OmegaConf.to_container(cfg.model, resolve=True), read_export_config(path)["model"]
    differ = sorted(k for k in wanted.keys() & found.keys() if wanted[k] != found[k])
    if differ:
        raise ConfigError(f"the encoder in {path} has model.{differ[0]}={found[differ[0]]!r} but preset "
                          f"{cfg.preset!r} has {wanted[differ[0]]!r}; pass the --preset it was trained with")
    model = load_encoder(path)
    return getattr(model, "image_encoder", model)  # an aligned export holds the encoder


def build_models(cfg: Any, args: argparse.Namespace, encoders: dict[str, nn.Module], train: Any, evaluation: Any,
                 workdir: Path) -> tuple[list[Any], dict[str, float]]:
    """The baseline, then a decoder per (encoder, image skip); and each decoder's extraction seconds."""
    from omegaconf import OmegaConf

    from fedmri.heads.segmentation import build_segmentation_head, skip_layers
    from fedmri.simulations.seg_baseline import TokenSegmenter, VolumeSegmenter, build_unet_baseline, extract_tokens

    torch.manual_seed(args.seed)
    net = build_unet_baseline(args.baseline, train.images.shape[1])
    models: list[Any] = [VolumeSegmenter(f"{args.baseline} from scratch", net, train, evaluation, lr=args.unet_lr)]
    extract_s = {}
    for key, encoder in encoders.items():
        (train_tokens, eval_tokens), seconds = extract_tokens(cfg, encoder, [train, evaluation],
                                                              workdir / f"features-{key}", skip_layers(cfg))
        print(f"[tokens] {key} encoder: {len(train)} training volumes in {seconds[0]:.1f} s "
              f"({len(evaluation)} evaluation volumes in {seconds[1]:.1f} s, not counted)", flush=True)
        for kind in args.decoders if key == "pretrained" else args.decoders[:1]:
            torch.manual_seed(args.seed)
            if kind.startswith("light"):  # the heads' light decoder, as heads.seg_decoder=light builds it
                stride = int(kind[len("light"):])
                light = OmegaConf.merge(cfg, {"heads": {"seg_decoder": "light", "seg_stride": stride,
                                                        "seg_feature_size": args.light_width}})
                head = build_segmentation_head(light, out_channels=2)
                name = f"light decoder /{stride}, {key} encoder"
            else:
                head = build_segmentation_head(cfg, out_channels=2, image_skip=kind == "skip")
                name = f"decoder, {key} encoder" + ("" if kind == "skip" else ", no skip")
            models.append(TokenSegmenter(name, head, train, train_tokens, evaluation, eval_tokens, lr=args.head_lr))
            extract_s[name] = seconds[0]
    return models, extract_s


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def report(runs: dict[str, Any], baseline: str, extract_s: dict[str, float], gflop: dict[str, float]) -> None:
    base = runs[baseline]
    target = TARGET_FRACTION * base.best.dice
    t_base = base.first_reaching(target)  # the best point reaches 95% of itself
    print(f"\ntarget = {TARGET_FRACTION:.0%} of the baseline's best Dice {base.best.dice:.3f} = {target:.3f}; "
          f"T_base = {t_base.train_s:.1f} s ({t_base.train_cpu_s:.1f} CPU s); the baseline stopped on its "
          f"{base.stopped}" + (" (the target is that of a capped baseline)" if base.stopped == "budget" else ""))
    if base.best.dice < base.curve[0].dice + MIN_GAIN:
        print(f"the baseline never rose {MIN_GAIN} above its untrained Dice: there is no target to reach and the "
              "ratios mean nothing; give it a larger --budget-s")
    print(f"| method | steps | stopped | s/step | GFLOP/step | best Dice | HD95 mm (undefined) | T s | T_base / T "
          f"| extraction s | T_base / (T + extraction) | T CPU s | T_base / T, CPU |\n|{' --- |' * 13}")
    notes = []
    for name, run in runs.items():
        best, hit, x = run.best, run.first_reaching(target), extract_s.get(name, 0.0)
        hd = f"{best.hd95:.1f}" if best.hd95 is not None else "-"
        t, cpu = (hit.train_s, hit.train_cpu_s) if hit is not None else (None, None)
        print(f"| {name} | {len(run.step_s)} | {run.stopped} | {run.median_step_s:.2f} | {gflop[name]:.1f} "
              f"| {best.dice:.3f} | {hd} ({best.hd95_undefined}) | {'never' if t is None else f'{t:.1f}'} "
              f"| {_ratio(t_base.train_s, t)} | {x:.1f} | {_ratio(t_base.train_s, None if t is None else t + x)} "
              f"| {'never' if cpu is None else f'{cpu:.1f}'} | {_ratio(t_base.train_cpu_s, cpu)} |")
        if hit is not None:
            continue
        same = base.first_reaching(best.dice)
        if best.dice < run.curve[0].dice + MIN_GAIN:
            notes.append(f"{name}: never rose {MIN_GAIN} above its untrained Dice {run.curve[0].dice:.3f} "
                         f"in {len(run.step_s)} steps")
        elif same is None:
            notes.append(f"{name}: never reached {target:.3f}, but its best, {best.dice:.3f}, beats the baseline's")
        else:
            notes.append(f"{name}: never reached {target:.3f}. Its best, {best.dice:.3f}, took {best.train_s:.1f} s "
                         f"({best.train_cpu_s:.1f} CPU s), the baseline's first scoring at or above it "
                         f"{same.train_s:.1f} s ({same.train_cpu_s:.1f} CPU s): T_base / T at that Dice "
                         f"{_ratio(same.train_s, best.train_s)}, {_ratio(same.train_s, best.train_s + x)} with "
                         f"extraction, {_ratio(same.train_cpu_s, best.train_cpu_s)} in CPU time")
    print("\n".join(notes))
    print("s/step: median wall seconds of a step; T: training seconds to the first scoring at or above the target "
          "(CPU: process CPU seconds, all threads: steadier than wall time when other jobs share the cores); HD95 "
          "at the best-Dice scoring, over volumes where prediction and mask are both non-empty (undefined: one of "
          "them empty).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "fedmri-bench-segmentation",
                        help="synthetic hospitals and catalogs (reused when complete)")
    parser.add_argument("--sites", type=int, default=4, help="4: evaluation volumes from 5 patients (3: from 3)")
    parser.add_argument("--series-per-site", type=int, default=40)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--override", nargs="*", default=[], help="config key=value, e.g. heads.seg_feature_size=8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", type=Path, help="a `fedmri export` folder; default: pretrain one here")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--decoders", type=lambda v: v.split(","), default=["noskip"],
                        help="decoders on the pretrained encoder, comma-separated: noskip (UNETR on tokens only), "
                             "skip (UNETR with the full-resolution image skip: 5x the U-Net's FLOPs per step), "
                             "light1/light2/light4 (heads.seg_decoder=light at that stride: 6x, 0.75x, 0.09x)")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="train every model on this share of the training masks (label efficiency), e.g. 0.1")
    parser.add_argument("--light-width", type=int, default=16, help="channels of the light decoders")
    parser.add_argument("--random", action="store_true",
                        help="also a tokens-only decoder on a randomly initialised encoder")
    parser.add_argument("--baseline", default="unet", choices=["unet", "dynunet"])
    parser.add_argument("--budget-s", type=float, default=150.0, help="most training seconds per model")
    parser.add_argument("--eval-every-s", type=float, default=12.0, help="training seconds between scorings")
    parser.add_argument("--patience", type=int, default=5, help="scorings without a Dice gain before a model stops")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=1e-3, help="default: heads.lr's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 15 s per model, 20 pretraining steps")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.budget_s, args.eval_every_s, args.patience = 20, 15.0, 5.0, 3
    if not set(args.decoders) <= set(DECODERS):
        parser.error(f"--decoders takes some of {', '.join(DECODERS)}, not {','.join(args.decoders)}")

    from fedmri.models import build_encoder
    from fedmri.simulations.seg_baseline import load_seg_set, train_side_by_side

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg, catalogs = prepare_catalogs(args)
    train, evaluation = load_seg_set(catalogs, ["train"]), load_seg_set(catalogs, ["val", "test"])
    if args.label_fraction < 1:
        train = label_subset(train, args.label_fraction, args.batch_size, args.seed)
    share = [100 * float(s.labels.float().mean()) for s in (train, evaluation)]
    print(f"[data] {len(train)} training and {len(evaluation)} evaluation volumes with lesions, "
          f"{cfg.data.preprocess.target_shape[0]}^3 (lesion: {share[0]:.2f}% / {share[1]:.2f}% of voxels)")
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
        workdir = Path(tmp)
        torch.manual_seed(args.seed)
        if args.encoder:
            encoders = {"pretrained": exported_encoder(args.encoder, cfg)}
            print(f"[encoder] exported encoder {args.encoder}")
        else:
            t = time.perf_counter()
            encoder, metrics = pretrain_encoder(cfg, catalogs, args.pretrain_steps, args.seed, workdir)
            encoders = {"pretrained": encoder}
            print(f"[encoder] pretrained here: {args.pretrain_steps} local steps on the pooled train splits in "
                  f"{time.perf_counter() - t:.0f} s (mean loss {metrics['loss']:.3f}); not counted below", flush=True)
        if args.random:
            torch.manual_seed(args.seed)
            encoders["random"] = build_encoder(cfg.model)
        models, extract_s = build_models(cfg, args, encoders, train, evaluation, workdir)
        gflop = {m.name: m.step_gflop(torch.arange(args.batch_size)) for m in models}
        print(f"[train] side by side, {args.budget_s:.0f} s each at most, scored every {args.eval_every_s:.0f} s",
              flush=True)
        runs = train_side_by_side(models, budget_s=args.budget_s, eval_every_s=args.eval_every_s,
                                  patience=args.patience, batch_size=args.batch_size, seed=args.seed,
                                  spacing=list(cfg.data.preprocess.target_spacing), min_gain=MIN_GAIN)
    report(runs, models[0].name, extract_s, gflop)
    print(f"total {time.perf_counter() - start:.0f} s; 1-minute load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs, {args.threads} torch threads")


if __name__ == "__main__":
    main()
