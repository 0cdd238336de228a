"""The SuperLink started by fedmri reads each request body whole before Flower's middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedmri.server import superlink
from fedmri.server.superlink import WholeBody

CHUNKS = [bytes([i]) * 1000 for i in range(40)]  # a 40 kB body as uvicorn delivers it: in pieces


def _call(app: Any, method: str = "POST", chunks: list[bytes] = CHUNKS, disconnect_at: int | None = None) -> dict:
    """Drive ``app`` with one HTTP request whose body arrives in ``chunks``; what the app answered."""
    incoming: list[dict] = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                            for i, c in enumerate(chunks)]
    if disconnect_at is not None:
        incoming = incoming[:disconnect_at] + [{"type": "http.disconnect"}]
    asked = {"receive": 0}
    answer: dict = {"body": b""}

    async def receive() -> dict:
        asked["receive"] += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "method": method, "path": "/echo", "raw_path": b"/echo", "query_string": b"",
             "headers": [], "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "",
             "http_version": "1.1", "asgi": {"version": "3.0"}}
    asyncio.run(app(scope, receive, send))
    answer["receives"] = asked["receive"]
    return answer


class Pass(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Response:
        return await call_next(request)


def _echo_app(seen: list[int]) -> Starlette:
    """An app behind two of Starlette's BaseHTTPMiddleware, as Flower's SuperLink is behind eight.

    Its endpoint answers with the body it read and records how many messages carried it.
    """
    async def echo(request: Request) -> Response:
        pieces = [chunk async for chunk in request.stream() if chunk]
        seen.append(len(pieces))
        return Response(b"".join(pieces))

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])],
                     middleware=[Middleware(Pass), Middleware(Pass)])


def test_a_post_body_reaches_the_app_in_one_message_and_unchanged() -> None:
    seen: list[int] = []
    stock = _call(_echo_app(seen))
    whole = _call(WholeBody(_echo_app(seen)))
    assert stock["status"] == whole["status"] == 200
    assert stock["body"] == whole["body"] == b"".join(CHUNKS)
    assert seen == [len(CHUNKS), 1]  # without it, the endpoint got 40 pieces through the middleware


def test_other_requests_pass_as_they_came() -> None:
    seen: list[int] = []
    answer = _call(WholeBody(_echo_app(seen)), method="GET", chunks=[b"ab", b"cd"])
    assert answer["status"] == 200 and answer["body"] == b"abcd"
    assert seen == [2]


def test_a_client_that_leaves_mid_body_still_reads_as_a_disconnect() -> None:
    got: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        got.append(await receive())
        got.append(await receive())

    _call(WholeBody(app), disconnect_at=3)
    assert got[0] == {"type": "http.request", "body": b"".join(CHUNKS[:3]), "more_body": False}
    assert got[1] == {"type": "http.disconnect"}


def test_install_puts_whole_body_outside_flowers_superlink_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink import main as superlink_main

    stock = superlink_main._get_middleware
    monkeypatch.setattr(superlink_main, "_get_middleware", stock)  # restored after the test
    assert superlink.install() and superlink.install()  # twice: still one WholeBody
    stack = [m.cls for m in superlink_main._get_middleware()]
    assert stack == [WholeBody, *(m.cls for m in stock())]
    assert sum(issubclass(c, BaseHTTPMiddleware) for c in stack) >= 2  # what it is there for


def test_without_the_hook_the_superlink_runs_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink import main as superlink_main

    monkeypatch.delattr(superlink_main, "_get_middleware")
    assert superlink.install() is False


def test_the_entry_point_needs_flowers_program(capsys: pytest.CaptureFixture) -> None:
    assert superlink.main([]) == 2
    assert "flower-superlink" in capsys.readouterr().err
