"""Training-step throughput of fedmri's ViT3D against MONAI's ViT of the same size.

For each preset and precision: samples/s of forward + backward + AdamW step at
the preset's input size, the FLOPs of one step counted by
``torch.utils.flop_counter`` (attention through the math kernel, so that every
matmul is seen; the fused attention kernels have no FLOP formula), the achieved
GFLOP/s against a large matmul in the same precision measured in the same run,
peak memory, and the fused attention kernel that fedmri's attention call is
eligible for (flash first, as torch's dispatcher prefers it). ``bf16`` is the
trainers' autocast (``train.precision``, :class:`fedmri.client.trainers.speed.Speed`):
fp32 weights, bf16 forward. Each (preset, model, precision) runs in a fresh
process so peak memory belongs to it alone: on CPU the growth of ``ru_maxrss``
over the RSS just before the first step (parameters, input and model
construction excluded; gradients, AdamW state and activations included); on
CUDA ``torch.cuda.max_memory_allocated``. The parent process imports nothing
heavy until every child has run: Linux carries the parent's RSS through the
fork of a ``spawn`` into the child's ``ru_maxrss``, which had made the tiny
model's peak read 107 MB instead of ~60. ``--compile`` compiles each model first
(``train.compile``) and reports the compile time: the warm-up steps, which a
federated round may pay again every round.

    python benchmarks/bench_encoder.py --presets tiny,small --steps 5
    python benchmarks/bench_encoder.py --device cuda --precision fp32,bf16 --steps 20 --batch base=16
    bash benchmarks/gpu_check.sh      # the prepared GPU run (base, fp32 and bf16, then compiled)

Prints a table; nothing is asserted (docs/architecture.md, "Benchmarks": benchmarks print figures).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

from _harness import run_in_process

BATCH = {"tiny": 8, "small": 4, "base": 2}


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: str, n: int = 4096, repeats: int = 5, dtype: str = "float32") -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n matmul in ``dtype``."""
    import torch

    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _build(impl: str, preset: str) -> tuple[Any, list[int], Any]:
    from fedmri.config import load_config
    from fedmri.models import ViT3D

    cfg = load_config(preset)
    m = cfg.model
    size = list(cfg.data.preprocess.target_shape)
    if impl == "fedmri":
        # Stochastic depth off: MONAI's ViT has none, and it saves no compute here.
        model = ViT3D(size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio,
                      m.qkv_bias, m.layerscale_init, 0.0, m.num_register_tokens)

        def loss_fn(out: dict) -> Any:
            return out["patch"].square().mean() + out["cls"].square().mean()
    else:
        from monai.networks.nets import ViT

        model = ViT(in_channels=m.in_chans, img_size=size, patch_size=m.patch_size, hidden_size=m.embed_dim,
                    mlp_dim=int(m.embed_dim * m.mlp_ratio), num_layers=m.depth, num_heads=m.num_heads,
                    proj_type="conv", pos_embed_type="learnable", classification=False,
                    dropout_rate=0.0, spatial_dims=3, qkv_bias=m.qkv_bias)

        def loss_fn(out: tuple) -> Any:
            return out[0].square().mean()
    return model, size, loss_fn


def attention_kernel(model: Any, x: Any, speed: Any) -> str:
    """The first fused SDPA kernel that runs ``model``'s attention on ``x``, or ``math``.

    Each kernel checks its own constraints (dtype, head dim, strides, no mask) and
    refuses when they fail, so the first one that runs is what the default
    dispatch picks among those tried.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend), speed.autocast(), torch.no_grad():
                model.forward(x[:1])  # uncompiled: a compiled graph fixed its kernel when it was built
            return name
        except RuntimeError:
            continue
    return "math"


def _worker(impl: str, preset: str, batch: int, steps: int, warmup: int, device: str, precision: str,
            compile_model: bool, queue: Any) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fedmri.client.trainers.speed import Speed, resolve_precision

    torch.manual_seed(0)
    model, size, loss_fn = _build(impl, preset)
    model = model.to(device).train()
    x = torch.rand(batch, 1, *size, device=device)
    # The fused kernel on both devices: the foreach AdamW step alone took ~15% of a
    # ViT-B step on CPU (the trainers keep torch's default there; fused on CUDA).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    speed = Speed(torch.device(device), resolve_precision(precision, device))  # fp32: no autocast
    if compile_model:
        model.compile(dynamic=False)

    def step() -> None:
        with speed.autocast():
            loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    # MONAI's ViT computes attention with einsum, not scaled_dot_product_attention.
    kernel = attention_kernel(model, x, speed) if impl == "fedmri" else "einsum"
    # Counted after timing, so its math-kernel attention does not set the peak; through
    # forward, not the compiled call, whose graph the flop counter cannot see into.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with speed.autocast():
            loss = loss_fn(model.forward(x))
        loss.backward()
    flops = counter.get_total_flops()
    median = statistics.median(times)
    queue.put({
        "impl": impl, "preset": preset, "precision": precision, "dtype": str(speed.dtype).removeprefix("torch."),
        "batch": batch, "size": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": median, "samples_s": batch / median, "gflop_step": flops / 1e9,
        "gflops": flops / median / 1e9, "peak_mb": peak_mb, "threads": torch.get_num_threads(),
        "attention": kernel, "warmup_s": warmup_s,
    })


def run_one(impl: str, preset: str, batch: int, steps: int, warmup: int, device: str, precision: str,
            compile_model: bool = False) -> dict[str, Any]:
    return run_in_process(_worker, impl, preset, batch, steps, warmup, device, precision, compile_model,
                          what=f"{impl} {preset} {precision} worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small,base", help="comma-separated presets")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated train.precision values: fp32, bf16 (autocast), auto")
    parser.add_argument("--models", default="fedmri,monai", help="comma-separated: fedmri, monai")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model; 'warm-up s' is then mostly compile time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", default="", help="per-preset batch overrides, e.g. base=16,small=32")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the models this many times, keep the best")
    args = parser.parse_args()

    # Every measurement first, in its own process, and only then torch in this one (see the
    # module docstring: a heavy parent inflates the children's ru_maxrss).
    precisions, models = args.precision.split(","), args.models.split(",")
    batches = BATCH | {k: int(v) for k, v in (item.split("=") for item in args.batch.split(",") if item)}
    results: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for preset in args.presets.split(","):
        best = results.setdefault(preset, {})
        for _ in range(args.repeats):
            for precision in precisions:
                for impl in models:
                    r = run_one(impl, preset, batches[preset], args.steps, args.warmup, args.device, precision,
                                args.compile)
                    key = (precision, impl)
                    if key not in best or r["step_s"] < best[key]["step_s"]:
                        best[key] = r

    import torch

    dtypes = sorted({r["dtype"] for best in results.values() for r in best.values()})
    peaks = {d: matmul_peak_gflops(args.device, dtype=d) for d in dtypes}
    if args.device == "cuda":
        device_name = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:  # which CPU and kernels (torch's version among them): the peak below differs by machine, not only by load
        from fedmri.machine import describe, machine_record

        device_name = f"{describe(machine_record())}, {torch.get_num_threads()} threads"
    print(f"device: {device_name}" + (", compiled" if args.compile else ""))
    for d, peak in peaks.items():
        print(f"{d} matmul peak (4096^2, best of 5): {peak:.0f} GFLOP/s")
    print(f"{'preset':6} {'model':7} {'prec':5} {'batch':>5} {'input':>6} {'params':>7} {'step s':>7} "
          f"{'samples/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>6} {'peak MB':>8} {'attn':>9} "
          f"{'warm-up s':>9}")
    for preset, best in results.items():
        for (precision, impl), r in best.items():
            print(f"{preset:6} {impl:7} {precision:5} {r['batch']:>5} {str(r['size'][0]) + '^3':>6} "
                  f"{r['params_m']:>6.1f}M {r['step_s']:>7.3f} {r['samples_s']:>9.2f} {r['gflop_step']:>10.1f} "
                  f"{r['gflops']:>8.1f} {100 * r['gflops'] / peaks[r['dtype']]:>5.0f}% {r['peak_mb']:>8.0f} "
                  f"{r['attention']:>9} {r['warmup_s']:>9.1f}")
        for precision in precisions:
            if {"fedmri", "monai"} <= set(models):
                ratio = best[(precision, "fedmri")]["samples_s"] / best[(precision, "monai")]["samples_s"]
                print(f"{preset:6} {precision}: fedmri/MONAI throughput ratio {ratio:.2f}")
        for impl in models:
            if {"fp32", "bf16"} <= set(precisions):
                gain = best[("bf16", impl)]["samples_s"] / best[("fp32", impl)]["samples_s"]
                print(f"{preset:6} {impl}: bf16/fp32 throughput ratio {gain:.2f}")
    mem = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "ru_maxrss growth over pre-training RSS"
    print(f"peak MB: {mem}; % peak: of the matmul peak in the step's precision; attn: the fused attention kernel "
          "fedmri's call is eligible for. Timings on a shared machine are noisy; rerun with --repeats 3 to compare.")


if __name__ == "__main__":
    main()
