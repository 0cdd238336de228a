"""The encoder's attention call fits the fused SDPA kernels (flash, memory-efficient) under bf16.

CUDA's flash kernel needs fp16/bf16 q, k, v whose last dimension is contiguous,
a head dimension that is a multiple of 8 (at most 256) and no explicit mask;
the memory-efficient kernel needs the same head-dimension alignment and also
takes fp32. CI has no GPU: these tests check those conditions on the call the
model makes, and that the CPU's flash kernel (which refuses what it cannot
run) accepts it. ``benchmarks/bench_encoder.py --device cuda`` reports the kernel
the GPU picks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedmri.config import list_presets, load_config
from fedmri.models import ViT3D


@pytest.mark.parametrize("preset", list_presets())
def test_every_presets_head_dimension_suits_the_fused_kernels(preset: str) -> None:
    m = load_config(preset).model
    head_dim = m.embed_dim // m.num_heads
    assert head_dim % 8 == 0 and head_dim <= 256, (preset, head_dim)


def test_the_attention_call_under_bf16_autocast_is_flash_eligible(monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append({"tensors": (q, k, v), "args": args, "kwargs": kwargs})
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = ViT3D([32, 32, 32], 16, 1, 32, 2, 2)  # head dim 16, as in the micro preset
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = model(x, masks=torch.zeros(2, 8, dtype=torch.bool))  # iBOT's masks do not reach attention
    out["cls"].sum().backward()
    assert len(calls) == 2  # one per block
    for call in calls:
        assert not call["args"] and not call["kwargs"]  # no mask, no dropout, not causal
        for t in call["tensors"]:
            assert t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.shape[-1] % 8 == 0
