"""Server tests build Flower messages outside a Flower runtime."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
