"""The ClientApp called in-process with Message objects (no Ray, no SuperLink)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import fedmri
from fedmri.client.app import app
from fedmri.protocol import PROTOCOL_VERSION


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _message(message_type: str) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord({"stage": "hello"})}), dst_node_id=7, message_type=message_type)


def test_query_reply_carries_versions_and_nothing_else() -> None:
    reply = app(_message(MessageType.QUERY), _context())
    assert reply.has_content()
    assert list(reply.content.keys()) == ["versions"]
    assert dict(reply.content["versions"]) == {"fedmri_version": fedmri.__version__,
                                               "protocol_version": PROTOCOL_VERSION}

