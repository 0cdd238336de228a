"""Test-wide settings: offline, quiet, and single-threaded BLAS where it helps."""

from __future__ import annotations

import os

# Nothing may be fetched from a model hub, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
