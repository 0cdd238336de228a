"""Training-step throughput of fedmri's ViT3D against MONAI's ViT of the same size.

For each preset: samples/s of forward + backward + AdamW step at the preset's
input size, the FLOPs of one step counted by ``torch.utils.flop_counter``
(attention through the math kernel, so that every matmul is seen; the fused
CPU attention kernel has no FLOP formula), the achieved GFLOP/s against a large
fp32 matmul measured in the same run, and peak memory. Each (preset, model)
runs in a fresh process so peak memory belongs to it alone: on CPU the growth
of ``ru_maxrss`` over the RSS just before the first step (parameters, input
and model construction excluded; gradients, AdamW state and activations
included); on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_encoder.py --presets tiny,small --steps 5
    python benchmarks/bench_encoder.py --device cuda --steps 20

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


def _worker(impl: str, preset: str, batch: int, steps: int, warmup: int, device: str, amp: bool,
            queue: Any) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, size, loss_fn = _build(impl, preset)
    model = model.to(device).train()
    x = torch.rand(batch, 1, *size, device=device)
    # The fused kernel: the foreach AdamW step alone took ~15% of a ViT-B step on CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)

    def step() -> None:
        with autocast:
            loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
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
    # Counted after timing, so its math-kernel attention does not set the peak.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with autocast:
            loss = loss_fn(model(x))
        loss.backward()
    flops = counter.get_total_flops()
    median = statistics.median(times)
    queue.put({
        "impl": impl, "preset": preset, "batch": batch, "size": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": median, "samples_s": batch / median, "gflop_step": flops / 1e9,
        "gflops": flops / median / 1e9, "peak_mb": peak_mb, "threads": torch.get_num_threads(),
    })


def run_one(impl: str, preset: str, batch: int, steps: int, warmup: int, device: str, amp: bool) -> dict[str, Any]:
    return run_in_process(_worker, impl, preset, batch, steps, warmup, device, amp, what=f"{impl} {preset} worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small,base", help="comma-separated presets")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bf16 autocast; the peak is then a bf16 matmul")
    parser.add_argument("--batch", default="", help="per-preset batch overrides, e.g. base=16,small=32")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the two models this many times, keep the best")
    args = parser.parse_args()

    import torch

    dtype = "bfloat16" if args.amp else "float32"
    peak = matmul_peak_gflops(args.device, dtype=dtype)
    batches = BATCH | {k: int(v) for k, v in (item.split("=") for item in args.batch.split(",") if item)}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; {dtype} matmul peak (4096^2, best of 5): {peak:.0f} GFLOP/s")
    print(f"{'preset':6} {'model':7} {'batch':>5} {'input':>9} {'params':>7} {'step s':>7} {'samples/s':>9} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>6} {'peak MB':>8}")
    for preset in args.presets.split(","):
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for impl in ("fedmri", "monai"):
                r = run_one(impl, preset, batches[preset], args.steps, args.warmup, args.device, args.amp)
                if impl not in best or r["step_s"] < best[impl]["step_s"]:
                    best[impl] = r
        for impl in ("fedmri", "monai"):
            r = best[impl]
            print(f"{preset:6} {impl:7} {r['batch']:>5} {str(r['size'][0]) + '^3':>9} "
                  f"{r['params_m']:>6.1f}M {r['step_s']:>7.3f} {r['samples_s']:>9.2f} {r['gflop_step']:>10.1f} "
                  f"{r['gflops']:>8.1f} {100 * r['gflops'] / peak:>5.0f}% {r['peak_mb']:>8.0f}")
        ratio = best["fedmri"]["samples_s"] / best["monai"]["samples_s"]
        print(f"{preset:6} fedmri/MONAI throughput ratio: {ratio:.2f}")
    mem = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "ru_maxrss growth over pre-training RSS"
    print(f"peak MB: {mem}. Timings on a shared machine are noisy; rerun with --repeats 3 to compare.")


if __name__ == "__main__":
    main()
