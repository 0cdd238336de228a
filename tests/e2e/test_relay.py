"""The relay that stalls a site's link in the deployment tests: what it keeps, what it passes, and
that what it kept arrives whole and in order, even after the server has closed the connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from deploy_helpers import Relay
from helpers.waiting import wait_until


@pytest.fixture()
def link() -> Iterator[tuple[Relay, socket.socket, socket.socket]]:
    """A relay in front of a TCP server on localhost, and one connection through it: the relay, the
    site's end and the server's end."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    relay = Relay(listener.getsockname()[1])
    host, port = relay.address.split(":")
    site = socket.create_connection((host, int(port)), timeout=5)
    try:
        wait_until(lambda: accepted, 5, "the relay never connected to the server", poll=0.01)
        yield relay, site, accepted[-1]
    finally:
        relay.close()
        listener.close()
        for sock in (site, *accepted):
            sock.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            break
        data += piece
    return data


def test_small_answers_pass_and_the_first_large_one_waits_with_what_follows(link) -> None:
    relay, site, end = link
    relay.hold("down", at_least=100)
    end.sendall(b"no work")
    assert _read(site, 7) == b"no work"  # small: passes while held
    site.sendall(b"ask")
    assert _read(end, 3) == b"ask"  # the other direction is not held
    work, after = b"W" * 500, b"tail"
    end.sendall(work)
    wait_until(lambda: relay.kept_bytes["down"] >= 500, 5, "the large answer was not kept", poll=0.01)
    end.sendall(after)  # small, but after a kept piece on the same connection: kept too
    wait_until(lambda: relay.kept_bytes["down"] == 504, 5, "what followed the large answer was not kept", poll=0.01)
    site.settimeout(0.3)
    with pytest.raises(TimeoutError):
        site.recv(1)
    relay.let_go("down")
    site.settimeout(5)
    assert _read(site, 504) == work + after
    end.sendall(b"W" * 500)  # let go: passes now
    assert _read(site, 500) == b"W" * 500


def test_a_server_that_closes_after_a_kept_answer_closes_once_it_has_passed(link) -> None:
    """uvicorn closes an idle connection 5 s after its last answer: the held answer must still arrive."""
    relay, site, end = link
    relay.hold("down", at_least=100)
    end.sendall(b"W" * 300)
    wait_until(lambda: relay.kept_bytes["down"] == 300, 5, "the answer was not kept", poll=0.01)
    end.close()
    wait_until(lambda: "after what is kept" in relay.describe(), 5, "the server's close was not seen", poll=0.01)
    relay.let_go("down")
    assert _read(site, 301) == b"W" * 300  # the answer, then the end of the connection
