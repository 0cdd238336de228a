"""What a result was computed with: the packages and the CPU's instruction set.

A seed fixes a simulation's data, splits and draws, but not its floating point: PyTorch picks
its CPU kernels (and MKL and oneDNN theirs) by the instruction set it finds at run time, and
kernels for another instruction set round differently. Training amplifies a last-bit difference
into a different model, so the same seed and packages repeat a figure exactly only on a CPU with
the same instruction set. Results record this, so that two figures can be told apart from two
machines.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The packages whose versions change what a run computes (the rest: tooling and transport).
PACKAGES = ("torch", "monai", "numpy", "opacus", "transformers", "flwr", "pandas")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    return {"cpu": _cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count() or 1, "packages": versions}


def describe(record: dict[str, Any]) -> str:
    """One line, leaving out what ``record`` lacks: ``fedmri 0.1.0, torch 2.13.0, AVX2 kernels, AMD EPYC, 2 cores``."""
    packages = record.get("packages", {})
    parts = [f"fedmri {packages['fedmri']}" if "fedmri" in packages else None,
             f"torch {packages['torch']}" if "torch" in packages else None,
             f"{record['cpu_kernels']} kernels" if record.get("cpu_kernels") else None,
             record.get("cpu"), f"{record['cores']} cores" if record.get("cores") else None]
    return ", ".join(p for p in parts if p)
