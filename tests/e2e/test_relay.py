"""The relay that stalls a site's link in the deployment tests: what it keeps, what it passes, and
that what it kept arrives whole and in order, even after the server has closed the connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from deploy_helpers import Relay


@pytest.fixture()
def server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on localhost that hands each accepted connection to the test."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()
    for sock in accepted:
        sock.close()


def _connect(relay: Relay, accepted: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    host, port = relay.address.split(":")
    site = socket.create_connection((host, int(port)), timeout=5)
    deadline = time.monotonic() + 5
    while not accepted:
        assert time.monotonic() < deadline, "the relay never connected to the server"
        time.sleep(0.01)
    return site, accepted[-1]


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_small_answers_pass_and_the_first_large_one_waits_with_what_follows(server) -> None:
    port, accepted = server
    relay = Relay(port)
    try:
        site, end = _connect(relay, accepted)
        relay.hold("down", at_least=100)
        end.sendall(b"no work")
        assert _read(site, 7) == b"no work"  # small: passes while held
        site.sendall(b"ask")
        assert _read(end, 3) == b"ask"  # the other direction is not held
        work, after = b"W" * 500, b"tail"
        end.sendall(work)
        _until(lambda: relay.kept_bytes["down"] >= 500, "the large answer was not kept")
        end.sendall(after)  # small, but after a kept piece on the same connection: kept too
        _until(lambda: relay.kept_bytes["down"] == 504, "what followed the large answer was not kept")
        site.settimeout(0.3)
        with pytest.raises(TimeoutError):
            site.recv(1)
        relay.let_go("down")
        site.settimeout(5)
        assert _read(site, 504) == work + after
        end.sendall(b"W" * 500)  # let go: passes now
        assert _read(site, 500) == b"W" * 500
    finally:
        relay.close()


def test_a_server_that_closes_after_a_kept_answer_closes_once_it_has_passed(server) -> None:
    """uvicorn closes an idle connection 5 s after its last answer: the held answer must still arrive."""
    port, accepted = server
    relay = Relay(port)
    try:
        site, end = _connect(relay, accepted)
        relay.hold("down", at_least=100)
        end.sendall(b"W" * 300)
        _until(lambda: relay.kept_bytes["down"] == 300, "the answer was not kept")
        end.close()
        _until(lambda: "after what is kept" in relay.describe(), "the server's close was not seen")
        relay.let_go("down")
        assert _read(site, 301) == b"W" * 300  # the answer, then the end of the connection
    finally:
        relay.close()
