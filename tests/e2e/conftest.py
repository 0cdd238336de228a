"""Fixtures for the e2e tests: every daemon a test starts is stopped when it ends, pass or fail,
and at the end no process that any of them started is left."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from deploy_helpers import Daemon, leftovers, stop_all


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; all of them are stopped when it ends, pass or fail."""
    started: list[Daemon] = []
    yield started
    stop_all(started)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the e2e tests, no process recorded in a daemon's tree may still run.

    Checked by process id and start time (``deploy_helpers.RECORDED``), never
    by name: other fedmri or Flower processes on the machine are not ours. A
    survivor is killed, then reported as an error.
    """
    yield
    left = leftovers()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes started by the e2e tests still ran after them: {left}"
