"""Fixtures for the e2e tests: every daemon a test starts is stopped when it ends, pass or fail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_helpers import Daemon, stop_all


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; all of them are stopped when it ends, pass or fail."""
    started: list[Daemon] = []
    yield started
    stop_all(started)
