"""A round's messages out and its replies in, one reply at a time.

Flower's ``Grid.send_and_receive`` returns when every reply is in, so the
coordinator would hold all of a round's replies at once (N x 446 MB at ``base``);
its deployed form also sleeps 3 s between pulls. :func:`exchange` pushes the
messages with ``push_messages`` and yields each reply as ``pull_messages`` brings
it, polling every 0.1 s and backing off to 1 s while nothing comes, so the
pipeline checks and stores each reply and lets it go before the next one
(:class:`~fedmri.strategies.updates.RoundUpdates`). :class:`ReplyBook` sorts them
as they come: useful replies, declines and failures, and at the end the sites
that sent nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from flwr.app import Message

from fedmri import trace
from fedmri.protocol import reply_status

POLL_S = (0.1, 1.0)  # first and longest pause between pulls while no reply comes


class GridLike(Protocol):
    """What the pipeline needs of a Flower ``Grid`` (tests use an in-process one)."""

    def get_node_ids(self) -> Any: ...
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...
    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any: ...


def exchange(grid: GridLike, messages: Sequence[Message], timeout_s: float) -> Iterator[Message]:
    """Push ``messages`` and yield each reply as it arrives, until all are in or ``timeout_s`` passes.

    A message the SuperLink does not accept (Flower logs why) gets no reply; the caller's
    :class:`ReplyBook` then counts that site as failed.
    """
    trace.event("push-start", messages=len(messages))
    pending = dict.fromkeys(mid for mid in grid.push_messages(messages) if mid)  # push order
    trace.event("push-done", messages=len(pending))
    deadline = time.monotonic() + timeout_s
    pause = POLL_S[0]
    while pending:
        asked = time.time()
        replies = list(grid.pull_messages(list(pending)))
        if replies:
            trace.event("pulled", replies=len(replies), seconds=time.time() - asked)
        for reply in replies:
            pending.pop(reply.metadata.reply_to_message_id, None)
            trace.event("reply", node=int(reply.metadata.src_node_id))
        pause = POLL_S[0] if replies else min(POLL_S[1], pause * 1.5)
        while replies:  # hand each reply over and drop it: the caller keeps what it needs
            yield replies.pop(0)
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def node_of(reply: Message, messages: Iterable[Message]) -> int:
    """The site that ``reply`` answers for: the destination of the message it answers, else its sender.

    An error the SuperLink makes for a site (e.g. "Node Unavailable") comes from the
    SuperLink itself, not from the site. Flower gives a message its id when it is pushed,
    so the ids are read here, after the push, never from a table made before it.
    """
    answers = reply.metadata.reply_to_message_id
    for msg in messages:
        if answers and msg.metadata.message_id == answers:
            return int(msg.metadata.dst_node_id)
    return int(reply.metadata.src_node_id)


class ReplyBook:
    """Sorts a round's replies as they come: useful, declined, failed; at the end, who sent nothing.

    A reply counts for the site whose message it answers (:func:`node_of`).
    """

    def __init__(self, messages: Sequence[Message], timeout_s: float) -> None:
        self.messages = list(messages)
        self.nodes = {int(m.metadata.dst_node_id) for m in messages}
        self.timeout_s = timeout_s
        self.answered: set[int] = set()
        self.problems: list[tuple[int, str, str]] = []

    def take(self, reply: Message) -> int | None:
        """The site's node id when ``reply`` is useful; otherwise the problem is recorded and ``None``."""
        node = node_of(reply, self.messages)
        self.answered.add(node)
        if reply.has_error():
            self.problems.append((node, "failed", reply.error.reason))
            return None
        declined, reason = reply_status(reply.content)
        if declined:
            self.problems.append((node, "declined", reason))
            return None
        return node

    def finish(self) -> list[tuple[int, str, str]]:
        """Every problem, the sites that sent nothing last."""
        for node in sorted(self.nodes - self.answered):
            self.problems.append((node, "failed", f"no reply within {self.timeout_s:.0f} s"))
        self.answered |= self.nodes
        return self.problems

