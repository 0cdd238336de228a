"""Test-wide settings: offline, quiet, and single-threaded BLAS where it helps."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Nothing may be fetched from a model hub, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models train several times faster so when the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
