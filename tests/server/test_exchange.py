"""Replies taken one at a time as the grid brings them, and sorted as they come."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from helpers import identity

from fedmri.client.replies import decline
from fedmri.server.exchange import ReplyBook, exchange, node_of


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    with identity.server_identity():
        yield


class SlowGrid:
    """Replies to node n after n x 0.2 s; node 0 never replies. Counts pulls and what each returned."""

    def __init__(self) -> None:
        self.pushed: dict[str, tuple[Message, float]] = {}
        self.pulls: list[int] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed[f"m{i}"] = (msg, time.monotonic())
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        now, out = time.monotonic(), []
        for mid in message_ids:
            msg, at = self.pushed[mid]
            node = msg.metadata.dst_node_id
            if node and now - at >= 0.2 * node:
                out.append(Message(RecordDict(), reply_to=msg))
                self.pushed[mid] = (msg, float("inf"))  # pulled once
        self.pulls.append(len(out))
        return out


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_replies_come_one_by_one_as_the_sites_answer() -> None:
    grid = SlowGrid()
    arrived = []
    start = time.monotonic()
    for reply in exchange(grid, _messages([3, 1, 2]), timeout_s=10):
        arrived.append((int(reply.metadata.src_node_id) if reply.metadata.src_node_id else None,
                        reply.metadata.reply_to_message_id, time.monotonic() - start))
    assert [mid for _, mid, _ in arrived] == ["m1", "m2", "m0"]  # nodes 1, 2, 3: in the order they answered
    assert arrived[0][2] < 0.5 and arrived[-1][2] < 1.6  # not all at the end, and no 3 s pauses
    assert max(grid.pulls) == 1


def test_a_site_that_never_answers_ends_the_wait_at_the_timeout() -> None:
    grid = SlowGrid()
    start = time.monotonic()
    replies = list(exchange(grid, _messages([1, 0]), timeout_s=1.0))
    assert len(replies) == 1 and 1.0 <= time.monotonic() - start < 2.0


def test_the_book_sorts_useful_declined_failed_and_silent_sites() -> None:
    messages = _messages([1, 2, 3, 4])
    SlowGrid().push_messages(messages)
    book = ReplyBook(messages, timeout_s=30)
    assert book.take(Message(RecordDict(), reply_to=messages[0])) == 1
    assert book.take(decline(messages[1], "policy says no")) is None
    assert book.take(Message(Error(code=0, reason="Node Unavailable"), reply_to=messages[2])) is None
    assert book.finish() == [(2, "declined", "policy says no"), (3, "failed", "Node Unavailable"),
                             (4, "failed", "no reply within 30 s")]


def test_an_error_the_superlink_makes_for_a_site_counts_for_that_site() -> None:
    # As the pipeline does: the book is made before the push, which gives the messages their ids;
    # a "Node Unavailable" reply comes from the SuperLink (node 1 here), answering site 3's message.
    messages = _messages([2, 3])
    book = ReplyBook(messages, timeout_s=30)
    SlowGrid().push_messages(messages)
    error = Message(Error(code=0, reason="Node Unavailable"), reply_to=messages[1])
    error.metadata.__dict__["_src_node_id"] = 1
    assert int(error.metadata.src_node_id) == 1
    assert node_of(error, messages) == 3
    assert book.take(error) is None
    assert book.finish() == [(3, "failed", "Node Unavailable"), (2, "failed", "no reply within 30 s")]
