"""What a result was computed with: the packages and the CPU's instruction set.

A seed fixes a simulation's data, splits and draws, but not its floating point: PyTorch picks
its CPU kernels (and MKL and oneDNN theirs) by the instruction set it finds at run time, and
kernels for another instruction set round differently. Training amplifies a last-bit difference
into a different model, so the same seed and packages repeat a figure exactly only on the same
kind of CPU: the same instruction set, and the same vendor, as MKL and oneDNN take their own
paths on each (an Intel and an AMD CPU gave different figures even with PyTorch's kernels pinned
to AVX2 on both: benchmarks/RESULTS.md, "A second CPU type"). Results record this, so that two
figures can be told apart from two machines.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The packages whose versions change what a run computes (the rest: tooling and transport).
PACKAGES = ("torch", "monai", "numpy", "opacus", "transformers", "flwr", "pandas")


# The CPU features that change which kernels run (AMX: oneDNN's bf16 matmuls), as /proc/cpuinfo names them.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``model name``, ``vendor_id`` and ``flags`` in /proc/cpuinfo; {} elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "vendor_id", "flags"):
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def machine_record() -> dict[str, Any]:
    """The CPU, its kernel instruction set as PyTorch uses it, the core count and package versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from fedmri import __version__

    versions = {"fedmri": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_vendor": info.get("vendor_id", ""), "cpu_features": [f for f in FEATURES if f in flags],
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count() or 1, "packages": versions}


def describe(record: dict[str, Any]) -> str:
    """One line, leaving out what ``record`` lacks.

    ``fedmri 0.1.0, torch 2.13.0, AVX2 kernels, AMD EPYC (AuthenticAMD), 2 cores``; a CPU with
    AMX says ``AVX512 kernels with AMX``.
    """
    packages = record.get("packages", {})
    amx = " with AMX" if "amx_bf16" in record.get("cpu_features", ()) else ""
    vendor = f" ({record['cpu_vendor']})" if record.get("cpu_vendor") and record.get("cpu") else ""
    parts = [f"fedmri {packages['fedmri']}" if "fedmri" in packages else None,
             f"torch {packages['torch']}" if "torch" in packages else None,
             f"{record['cpu_kernels']} kernels{amx}" if record.get("cpu_kernels") else None,
             f"{record['cpu']}{vendor}" if record.get("cpu") else None,
             f"{record['cores']} cores" if record.get("cores") else None]
    return ", ".join(p for p in parts if p)
