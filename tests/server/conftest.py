"""Server tests build Flower messages outside a Flower runtime."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import identity


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    with identity.server_identity():
        yield
