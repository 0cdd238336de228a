"""An in-process Grid: the real ClientApp called directly, no Ray, no SuperLink (not a test module)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """Delivers each message to the ClientApp of its node in this process.

    ``send_and_receive`` delivers every message at once. ``push_messages`` queues them and
    each ``pull_messages`` delivers one, so a caller that pulls sees replies one at a time,
    as from a deployed SuperLink.

    Args:
        site_files: node id -> that site's site.yaml (the SuperNode's node config).
        tamper: optional hook ``(node_id, reply) -> reply`` to corrupt or drop
            (return None) a site's reply, as a faulty or malicious site would.
    """

    def __init__(self, site_files: dict[int, Path],
                 tamper: Callable[[int, Message], Message | None] | None = None) -> None:
        from fedmri.client.app import app

        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"site-config": str(p)},
                                    state=RecordDict(), run_config={}) for n, p in site_files.items()}
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's InMemoryGrid does
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The reply to the first of ``message_ids`` still pending (delivered now); a dropped reply is none."""
        for message_id in message_ids:
            msg = self.pending.pop(message_id, None)
            if msg is not None:
                reply = self._deliver(msg)
                return [] if reply is None else [reply]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = [self._deliver(msg) for msg in messages]
        return [reply for reply in replies if reply is not None]

    def _deliver(self, msg: Message) -> Message | None:
        self.sent.append(msg)
        node = msg.metadata.dst_node_id
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # the SuperNode turns a crash into an error reply
            reply = Message(Error(code=0, reason=f"ClientApp raised {exc!r}"), reply_to=msg)
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        if reply is not None:
            self.received.append(reply)
        return reply
