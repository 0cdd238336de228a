"""The task identity Flower's ServerApp runtime sets, for server code run outside that runtime."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# What Flower's ServerApp runtime sets before a ServerApp creates messages.
SERVER_IDENTITY = {"_task_id": 1, "_run_id": 1, "_node_id": 0}


@contextmanager
def server_identity() -> Iterator[None]:
    """Set ``TaskIdentity`` as a ServerApp's runtime would (task 1, run 1, node 0), then restore it.

    Flower messages built outside a Flower runtime (tests, the in-process
    ``LocalGrid``, benchmarks) need it: ``Message`` reads the task identity.
    """
    from flwr.supercore.task_identity import TaskIdentity

    before = {name: TaskIdentity.__dict__[name] for name in SERVER_IDENTITY}
    try:
        for name, value in SERVER_IDENTITY.items():
            setattr(TaskIdentity, name, value)
        yield
    finally:
        for name, value in before.items():
            setattr(TaskIdentity, name, value)
