"""Reply Messages built in-process, as a site's ClientApp would send them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from helpers import identity

MakeReply = Callable[..., Message]


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    with identity.server_identity():
        yield


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


@pytest.fixture
def record() -> Callable[[Mapping[str, np.ndarray]], ArrayRecord]:
    """``record(arrays)``: an ArrayRecord holding ``arrays`` as they are (no dtype conversion)."""
    return _record


@pytest.fixture
def make_reply() -> MakeReply:
    """``make_reply(node, arrays, num_examples=10, **metrics)``: a train reply from site ``node``.

    ``error="..."`` gives an error reply instead; ``content=RecordDict`` replaces the content.
    """

    def make(node: int, arrays: Mapping[str, np.ndarray] | None = None, num_examples: float = 10,
             *, error: str | None = None, content: RecordDict | None = None, **metrics: float) -> Message:
        instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        if error is not None:
            return Message(Error(code=1, reason=error), reply_to=instruction)
        if content is None:
            content = RecordDict({"arrays": _record(arrays or {}),
                                  "metrics": MetricRecord({"num-examples": num_examples, **metrics})})
        return Message(content, reply_to=instruction)

    return make
