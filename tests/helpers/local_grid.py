"""An in-process Grid: the real ClientApp called directly, no Ray, no SuperLink (not a test module)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """Delivers each message to the ClientApp of its node in this process.

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

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
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
                replies.append(reply)
        return replies
