"""Flower's SuperLink, with each request body read whole before Flower's HTTP middleware sees it.

``fedmri server start`` runs ``python -m fedmri.server.superlink PATH/flower-superlink ARGS``:
Flower's own ``flower-superlink`` entry point with the same arguments, after one change to the
app it builds. In flwr 1.42 every byte between the ServerApp and the sites crosses the
SuperLink over HTTP, and its FastAPI app stacks 8 Starlette ``BaseHTTPMiddleware`` layers
(``flwr.superlink.main._get_middleware``). Each re-streams a request body chunk by chunk
(64-256 KB) on the SuperLink's one event loop, so taking in a 5 MB object costs about 4 times
the CPU that sending it costs the ServerApp (``benchmarks/RESULTS.md``, "Where a base
round's float32 overhead goes"): at ``base`` the SuperLink's single core is what a round's
transfers wait on. :class:`WholeBody`, a pure ASGI middleware placed outside Flower's,
reads each POST body whole and hands it on as one message; Starlette's middleware then
passes that one message along instead of hundreds of chunks. Nothing else changes: the
same routes, handlers, authentication and responses. Flower's protobuf middleware reads
every body whole anyway, so memory per request is unchanged.

If a Flower version no longer has the hook this patches, the SuperLink starts unchanged and
says so (one line). ``FEDMRI_STOCK_SUPERLINK=1`` starts it unchanged on purpose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

STOCK_ENV = "FEDMRI_STOCK_SUPERLINK"


class WholeBody:
    """ASGI middleware: read an HTTP POST body whole, then give it to the app in one message.

    Later ``receive`` calls (e.g. waiting for the client to disconnect) go to the server as
    before. A client that disconnects mid-body gets its partial body and then the disconnect.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        pending: list[ASGIMessage] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect before the body ended
                pending.append(message)
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})
        del chunks

        async def replay() -> ASGIMessage:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def install() -> bool:
    """Put :class:`WholeBody` outside Flower's SuperLink middleware; False if Flower has no such hook."""
    try:
        from flwr.superlink import main as superlink_main
        from starlette.middleware import Middleware
    except ImportError:
        return False
    stock = getattr(superlink_main, "_get_middleware", None)
    if stock is None or getattr(stock, "fedmri_whole_body", False):
        return stock is not None

    def with_whole_body() -> list[Any]:
        return [Middleware(WholeBody), *stock()]

    with_whole_body.fedmri_whole_body = True  # type: ignore[attr-defined]
    superlink_main._get_middleware = with_whole_body
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmri.server.superlink FLOWER_SUPERLINK [ARGS]``: Flower's SuperLink with ARGS."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m fedmri.server.superlink PATH/flower-superlink [flower-superlink arguments]",
              file=sys.stderr)
        return 2
    if os.environ.get(STOCK_ENV) != "1" and not install():
        print("fedmri: this Flower has no flwr.superlink.main._get_middleware; the SuperLink runs "
              "unchanged (request bodies cross its middleware in chunks)", file=sys.stderr, flush=True)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = argv  # Flower reads its arguments (and its program name) from sys.argv
    return flower_superlink() or 0


if __name__ == "__main__":
    sys.exit(main())
