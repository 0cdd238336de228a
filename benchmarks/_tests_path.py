"""Puts tests/ on ``sys.path``, for the benchmarks that reuse the shared test helpers (``helpers``).

Benchmarks run as scripts (``python benchmarks/NAME.py``), outside pytest's
``pythonpath`` setting (pyproject.toml): ``import _tests_path`` first, then
``from helpers.local_grid import LocalGrid``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
