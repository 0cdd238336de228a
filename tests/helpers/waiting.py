"""Polling for a condition with a deadline: the one loop the tests that watch processes share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.05) -> T:
    """``condition()``'s first truthy value, looked for every ``poll`` s; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(poll)
    return value
