"""DP-SGD pretraining step time against the non-DP step, per preset and batch size.

Three steps, each on its own copy of the same model, fed the same random crops
(the preset's crop sizes, one channel, drawn outside the timer) and the same
iBOT mask draws:

- ``non-DP``: the pretrain trainer's step (:func:`fedmri.client.trainers.pretrain.run_pretrain`):
  one forward of the collated batch with KoLeo as the preset has it and the
  centres updated, backward, the preset's gradient clip, AdamW, teacher EMA;
- ``non-DP obj``: the same step on the DP objective (KoLeo off by
  :func:`~fedmri.client.trainers.pretrain_dp.make_private`, centres fixed), which
  separates the cost of the objective from the cost of per-sample gradients;
- ``DP-SGD``: :func:`~fedmri.client.trainers.pretrain_dp.dp_ssl_step` (each
  sample's crops collated alone, one ``autograd.grad`` per sample, clip 1.0,
  noise 1.0), then AdamW and the teacher EMA.

A ``ref`` row times ``non-DP obj`` at batch 1, so that the DP gradient phase at
batch B can be set against B batch-1 passes.

All rows of a preset run in one process, interleaved: each round takes one step
of every (batch, step) row in turn, so a change of load on a shared machine
falls on all rows alike and the ratios stay fair. Peak memory is measured apart,
one forked process per row running one step: growth of ``ru_maxrss`` over the
RSS just before it (AdamW state, activations and the stacked per-sample
gradients included).

OpenMP's wait policy is PASSIVE by default: with libgomp's spin-waiting, two
threads on two cores that other jobs also use ran tiny's step about 10x slower
and erratically for a stretch of minutes (0.9 s against 0.09 s, runs back to
back), which measured the neighbours, not the step; at other times spinning was
0-25% faster. ``--omp-wait-policy library`` keeps the spinning.

``--vectorized`` also tries ``per_sample_grads(..., vectorized=True)``
(``vmap(grad(loss))``) on the real objective. It fails there: the
meta-architecture decides whether to run iBOT with ``bool(masks.any())`` and
gathers masked tokens with ``patch[masks]``, data-dependent control flow and
shapes that vmap refuses; the error is printed. It then times vmap against the
loop on the objective without iBOT masks (DINO terms only, ``masks=None``), where
vmap does run: through ``vmap(..., randomness="different")`` called here,
because ``per_sample_grads`` keeps vmap's default ``randomness="error"``, which
refuses the stochastic depth of ``small`` (``drop_path_rate`` 0.1).

    .venv/bin/python benchmarks/bench_dp.py                      # 6-7 min on 2 shared cores
    .venv/bin/python benchmarks/bench_dp.py --presets tiny --repeats 20 --vectorized
    .venv/bin/python benchmarks/bench_dp.py --presets small --batch-sizes 2 --no-reference --vectorized

Prints a table and ratios; nothing is asserted (docs/architecture.md, "Benchmarks": benchmarks print figures).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

from _harness import run_in_process

BATCH_SIZES = {"tiny": [2, 4, 8], "small": [2, 4], "base": [2]}
# A round of small's rows took 40-50 s on 2 shared cores (load 3-4): 2 + 5 rounds keep the default run
# near 6-7 minutes; base gets fewer (and says so).
REPEATS = {"tiny": 10, "small": 5, "base": 3}
WARMUP = {"tiny": 2, "small": 2, "base": 1}
STEPS = ("non-DP", "non-DP obj", "DP-SGD")
VMAP_STEPS = ("DP-SGD no-mask", "DP-SGD vmap no-mask")
NOISE, CLIP = 1.0, 1.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _random_crops(cfg: Any, generator: Any) -> dict[str, list[Any]]:
    """One sample's crops, as :class:`fedmri.ssl.MultiCropAugmentation` returns them (1 channel)."""
    import torch

    s = cfg.ssl
    return {"global_crops": [torch.rand(1, *(s.global_crops_size,) * 3, generator=generator) for _ in range(2)],
            "local_crops": [torch.rand(1, *(s.local_crops_size,) * 3, generator=generator)
                            for _ in range(s.local_crops_number)]}


class _ClipTimer:
    """Times ``clip_and_noise`` inside ``dp_ssl_step``: ``dp_step`` looks the name up in dp_sgd at each call."""

    def __init__(self) -> None:
        from fedmri.client.privacy import dp_sgd

        self.seconds = 0.0
        self.inner = dp_sgd.clip_and_noise
        dp_sgd.clip_and_noise = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out


class Step:
    """One kind of step: its own copy of the model (same initial weights), AdamW and inputs."""

    def __init__(self, name: str, cfg: Any, clip_timer: _ClipTimer) -> None:
        import torch

        from fedmri.client.trainers.optim import set_rates
        from fedmri.client.trainers.pretrain_dp import make_private
        from fedmri.ssl import SSLMetaArch, build_mask_generator

        self.name, self.cfg, self.clip_timer = name, cfg, clip_timer
        torch.manual_seed(0)
        self.meta = SSLMetaArch(cfg).train()
        self.private = name != "non-DP"
        if self.private:
            make_private(self.meta)
        self.optimizer = torch.optim.AdamW(self.meta.param_groups())
        set_rates(self.optimizer, cfg.ssl.lr, cfg.ssl.weight_decay)
        self.params = {n: p for n, p in self.meta.student.named_parameters() if p.requires_grad}
        self.masker = (build_mask_generator(cfg) if self.meta.ibot_loss is not None and "no-mask" not in name
                       else None)
        self.noise = torch.Generator().manual_seed(1)

    def inputs(self, batch: int, step: int) -> Any:
        """The crops of ``batch`` samples at round ``step``: the same for every kind of step."""
        import numpy as np
        import torch

        from fedmri.ssl import collate_multicrop

        s = self.cfg.ssl
        gen = torch.Generator().manual_seed(1000 * step + batch)
        rng = np.random.default_rng(1000 * step + batch)
        crops = [_random_crops(self.cfg, gen) for _ in range(batch)]
        if self.name.startswith("non-DP"):
            return collate_multicrop(crops, self.masker, s.mask_sample_probability, s.mask_ratio_min_max, rng)
        return [collate_multicrop([c], self.masker, s.mask_sample_probability, s.mask_ratio_min_max, rng)
                for c in crops]

    def run(self, inputs: Any) -> tuple[float, float, float]:
        """One step; seconds of the gradient phase, of clip + noise within it, and of AdamW + EMA."""
        self.clip_timer.seconds = 0.0
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._gradient(inputs)
        t1 = time.perf_counter()
        self.optimizer.step()
        self.meta.update_teacher(self.cfg.ssl.momentum_teacher)
        return t1 - t0, self.clip_timer.seconds, time.perf_counter() - t1

    def _gradient(self, inputs: Any) -> None:
        import torch

        from fedmri.client.trainers.pretrain_dp import dp_ssl_step

        s, batch = self.cfg.ssl, len(inputs) if isinstance(inputs, list) else None
        if batch is None:  # non-DP: one pass over the collated batch
            losses = self.meta(inputs, inputs["masks"], s.teacher_temp, update_centers=not self.private)
            sum(losses.values()).backward()
            if s.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.clip_grad)
        elif "vmap" in self.name:
            grads = self.clip_timer(_vmap_grads(self.meta, self.params, inputs, s.teacher_temp), CLIP, NOISE,
                                    self.noise, batch)
            for name, p in self.params.items():
                p.grad = grads[name]
        else:
            dp_ssl_step(self.meta, inputs, s.teacher_temp, max_grad_norm=CLIP, noise_multiplier=NOISE,
                        expected_batch_size=batch, generator=self.noise)


def _sample_loss(meta: Any, teacher_temp: float) -> Callable[..., Any]:
    """``loss(params, global_crops, local_crops, masks)`` of one sample, through ``functional_call``."""
    from torch.func import functional_call

    def loss(params: dict[str, Any], g: Any, local: Any, masks: Any = None) -> Any:
        losses = functional_call(meta, {f"student.{k}": v for k, v in params.items()},
                                 ({"global_crops": g, "local_crops": local}, masks, teacher_temp),
                                 {"update_centers": False})
        return sum(losses.values())

    return loss


def _vmap_grads(meta: Any, params: dict[str, Any], samples: list[dict[str, Any]], teacher_temp: float) -> Any:
    """Per-sample gradients by ``vmap(grad(loss))`` without iBOT masks; a different DropPath draw per sample."""
    import torch
    from torch.func import grad, vmap

    g = torch.stack([x["global_crops"] for x in samples])  # B, 2, 1, G, G, G
    local = torch.stack([x["local_crops"] for x in samples])  # B, N, 1, L, L, L
    detached = {n: p.detach() for n, p in params.items()}
    return vmap(grad(_sample_loss(meta, teacher_temp)), in_dims=(None, 0, 0), randomness="different")(
        detached, g, local)


def _vmap_masks_error(step: Step) -> str:
    """Try ``per_sample_grads(vectorized=True)`` on the real objective (iBOT masks on); the error, or ''."""
    import numpy as np
    import torch

    from fedmri.client.privacy.dp_sgd import per_sample_grads
    from fedmri.ssl import build_mask_generator, collate_multicrop

    cfg = step.cfg
    loss = _sample_loss(step.meta, cfg.ssl.teacher_temp)
    samples = [collate_multicrop([_random_crops(cfg, torch.Generator().manual_seed(i))], build_mask_generator(cfg),
                                 1.0, cfg.ssl.mask_ratio_min_max, np.random.default_rng(i)) for i in range(2)]
    try:
        per_sample_grads(lambda p, x: loss(p, *x), step.params,
                         [(x["global_crops"], x["local_crops"], x["masks"]) for x in samples], vectorized=True)
    except Exception as exc:  # noqa: BLE001 (reported, not handled)
        # The last frame in fedmri's own code says which construct vmap refused.
        ours = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename
                and "bench_dp" not in f.filename]
        where = f" at {os.path.relpath(ours[-1].filename)}:{ours[-1].lineno} `{ours[-1].line}`" if ours else ""
        return f"{type(exc).__name__}{where}: {str(exc).splitlines()[0][:120]}..."
    return ""


def _time_preset(spec: dict[str, Any], queue: Any) -> None:
    """Every (batch, step) row of one preset, interleaved round by round; medians per row."""
    import warnings

    import torch

    from fedmri.config import load_config

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["preset"])
    timer = _ClipTimer()
    steps = {name: Step(name, cfg, timer) for name in dict.fromkeys(m for _, m in spec["rows"])}
    out: dict[str, Any] = {"vmap_error": _vmap_masks_error(steps[VMAP_STEPS[1]]) if VMAP_STEPS[1] in steps else ""}
    times: dict[tuple[int, str], list[tuple[float, float, float]]] = {row: [] for row in spec["rows"]}
    rounds = spec["warmup"] + spec["repeats"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r in range(rounds):
            t = time.perf_counter()
            for batch, name in spec["rows"]:
                inputs = steps[name].inputs(batch, r)
                measured = steps[name].run(inputs)
                if r >= spec["warmup"]:
                    times[(batch, name)].append(measured)
            print(f"  {spec['preset']} round {r + 1}/{rounds}{' (warm-up)' if r < spec['warmup'] else ''}: "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    # "There is a performance drop because we have not yet implemented the batching rule for aten::..."
    out["fallbacks"] = sorted({str(w.message).split("rule for ")[-1].split(".")[0] for w in caught
                               if "performance drop" in str(w.message)})
    out["rows"] = {}
    for row, ts in times.items():
        total = [g + o for g, _, o in ts]
        out["rows"][row] = {"step_s": statistics.median(total), "min_s": min(total), "max_s": max(total),
                            "grad_s": statistics.median(g for g, _, _ in ts),
                            "clip_s": statistics.median(c for _, c, _ in ts),
                            "opt_s": statistics.median(o for _, _, o in ts)}
    out["params_m"] = sum(p.numel() for p in next(iter(steps.values())).params.values()) / 1e6
    out["threads"] = torch.get_num_threads()
    queue.put(out)


def _peak_memory(spec: dict[str, Any], queue: Any) -> None:
    """ru_maxrss growth of one step of one row, in a process of its own."""
    import warnings

    import torch

    from fedmri.config import load_config

    warnings.filterwarnings("ignore", message="There is a performance drop")  # reported by _time_preset
    torch.set_num_threads(spec["threads"])
    step = Step(spec["mode"], load_config(spec["preset"]), _ClipTimer())
    inputs = step.inputs(spec["batch"], 0)
    before = _rss_mb()
    step.run(inputs)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)


def _in_fork(target: Callable[[dict[str, Any], Any], None], spec: dict[str, Any]) -> Any:
    # Forked from a parent that imported fedmri.ssl (MONAI: ~10 s on a loaded 2-core machine) and ran no
    # torch op, so no thread pool is copied; each child has its own ru_maxrss.
    return run_in_process(target, spec, start_method="fork", what=f"{target.__name__} {spec.get('preset')}")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    parser.add_argument("--batch-sizes", type=_ints, default=None,
                        help="comma-separated batch sizes for every preset (default: tiny 2,4,8; small 2,4)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (one step of each row), median reported (default: tiny 10, small 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the workers")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "library"],
                        help="OMP_WAIT_POLICY for the workers; 'library' leaves the environment's (libgomp spins)")
    parser.add_argument("--vectorized", action="store_true",
                        help="also try vmap over samples; times it against the loop without iBOT masks")
    parser.add_argument("--no-reference", action="store_true", help="skip the batch-1 reference row")
    parser.add_argument("--no-memory", action="store_true", help="skip the one-step peak-memory processes")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.omp_wait_policy != "library":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # libgomp reads it once, when torch loads it

    start = time.perf_counter()
    # Imported once here for the forked workers.
    import fedmri.client.trainers.pretrain_dp  # noqa: F401
    import fedmri.ssl  # noqa: F401
    from fedmri.client.trainers.pretrain import min_ssl_batch
    from fedmri.config import load_config

    load = os.getloadavg()
    print(f"CPU, {args.threads} torch threads, {os.cpu_count()} cores, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"DP-SGD noise {NOISE}, clip {CLIP}", flush=True)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    kinds = STEPS + (VMAP_STEPS if args.vectorized else ())
    for preset in args.presets.split(","):
        batches = args.batch_sizes or BATCH_SIZES.get(preset, [2])
        repeats = args.repeats or REPEATS.get(preset, 3)
        warmup = WARMUP.get(preset, 1) if args.warmup is None else args.warmup
        reduced = args.repeats is None and args.warmup is None and (repeats < 5 or warmup < 2)
        print(f"{preset}: {repeats} timed rounds after {warmup} warm-up"
              + (" (reduced: a step takes many seconds; --repeats 5 --warmup 2 for the full count)" if reduced
                 else ""), flush=True)
        min_batch = min_ssl_batch(load_config(preset))
        rows = [] if args.no_reference else [(1, "non-DP obj")]
        for b in batches:
            for kind in kinds:
                if kind == "non-DP" and b < min_batch:
                    notes.append(f"{preset} non-DP at batch {b} skipped: KoLeo needs {min_batch} samples")
                    continue
                if (b, kind) not in rows:
                    rows.append((b, kind))
        spec = {"preset": preset, "rows": rows, "warmup": warmup, "repeats": repeats, "threads": args.threads}
        timed = _in_fork(_time_preset, spec)
        if timed["vmap_error"]:
            notes.append(f"{preset}: per_sample_grads(vectorized=True) on the real objective (iBOT masks on) "
                         f"failed: {timed['vmap_error']}")
        if timed["fallbacks"]:
            notes.append(f"{preset}: vmap has no batching rule for {', '.join(timed['fallbacks'])}; it loops over "
                         "the samples there (BatchedFallback)")
        for batch, kind in rows:
            peak = (None if args.no_memory else
                    _in_fork(_peak_memory, {"preset": preset, "batch": batch, "mode": kind, "threads": args.threads}))
            results.append({"preset": preset, "batch": batch, "mode": kind, "warmup": warmup, "repeats": repeats,
                            "ref": (batch, kind) == (1, "non-DP obj") and not args.no_reference,
                            "peak_mb": peak, **timed["rows"][(batch, kind)]})
    report(results)
    for note in notes:
        print(f"note: {note}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"total {time.perf_counter() - start:.0f} s")


def report(results: list[dict[str, Any]]) -> None:
    print(f"\n{'preset':6} {'batch':>5} {'step':20} {'steps':>5} {'median s':>8} {'min s':>7} {'grad s':>7} "
          f"{'clip+noise s':>12} {'opt+EMA s':>9} {'s/sample':>8} {'peak MB':>7}")
    for r in results:
        label = r["mode"] + (" (ref)" if r["ref"] else "")
        steps = f"{r['warmup']}+{r['repeats']}"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{r['preset']:6} {r['batch']:>5} {label:20} {steps:>5} {r['step_s']:>8.3f} {r['min_s']:>7.3f} "
              f"{r['grad_s']:>7.3f} {r['clip_s']:>12.3f} {r['opt_s']:>9.3f} {r['step_s'] / r['batch']:>8.3f} "
              f"{peak:>7}")
    print("steps: warm-up + timed rounds; grad s: forward + backward (+ the preset's clip for non-DP; per-sample "
          "passes, clip and noise for DP); peak MB: ru_maxrss growth over one step in a fresh process.")
    print(f"\n{'preset':6} {'batch':>5} {'DP/non-DP':>9} {'DP/non-DP obj':>13} {'obj/non-DP':>10} "
          f"{'DP grad/(B x ref grad)':>22} {'vmap/loop':>9}")
    by = {(r["preset"], r["batch"], r["mode"]): r for r in results}
    for (preset, batch, mode), r in by.items():
        if mode != "DP-SGD":
            continue
        base, obj = by.get((preset, batch, "non-DP")), by.get((preset, batch, "non-DP obj"))
        one = next((x for x in results if x["preset"] == preset and x["ref"]), None)
        loop, vm = by.get((preset, batch, VMAP_STEPS[0])), by.get((preset, batch, VMAP_STEPS[1]))
        cells = [f"{r['step_s'] / base['step_s']:.2f}" if base else "-",
                 f"{r['step_s'] / obj['step_s']:.2f}" if obj else "-",
                 f"{obj['step_s'] / base['step_s']:.2f}" if obj and base else "-",
                 f"{r['grad_s'] / (batch * one['grad_s']):.2f}" if one else "-",
                 f"{vm['step_s'] / loop['step_s']:.2f}" if vm and loop else "-"]
        print(f"{preset:6} {batch:>5} {cells[0]:>9} {cells[1]:>13} {cells[2]:>10} {cells[3]:>22} {cells[4]:>9}")


if __name__ == "__main__":
    main()
