"""The warm ClientApp starter (fedmri.client.warm): real processes, a real Unix socket, real signals.

The launcher that Flower's SuperExec starts hands its ClientApp to the starter,
which forks it; the launcher stands in for it (signals in, exit code out) and
the child dies with the launcher. Without a starter the launcher runs it cold
(tests/client/test_guard.py).
"""

from __future__ import annotations

import importlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.waiting import wait_until

from fedmri.client.guard import write_launcher
from fedmri.client.reaper import _catches_sigterm
from fedmri.client import warm
from fedmri.client.warm import SOCKET_NAME, preload, socket_path
from fedmri.stages import StageSpec, registered

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    folder = tmp_path_factory.mktemp("warm") / "bin"
    launcher = write_launcher(folder)
    proc = subprocess.Popen([sys.executable, "-m", "fedmri.client.warm", str(socket_path(folder))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "warm ClientApp starter ready" in proc.stderr.readline()
        assert socket_path(folder).stat().st_mode & 0o077 == 0  # the site user's only
        yield proc, launcher
    finally:
        proc.terminate()
        proc.wait(30)
    # SIGTERM: gone without finalising its imports, its socket with it.
    assert proc.returncode == 0 and not socket_path(folder).exists()


def _blocking(launcher: Path) -> subprocess.Popen:
    """A ClientApp that waits for a runtime API nobody serves (Flower retries for minutes)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.Popen([str(launcher), "--runtime-api-address", f"127.0.0.1:{port}", "--token", "7",
                             "--insecure"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_clientapp_runs_in_a_child_of_the_starter_with_the_launchers_streams(starter) -> None:
    proc, launcher = starter
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: flwr-clientapp" in out.stdout and "--runtime-api-address" in out.stdout
    assert proc.poll() is None  # the starter goes on

    before = _children(proc.pid)  # a child on its way out may still be listed
    app = _blocking(launcher)
    try:
        wait_until(lambda: _children(proc.pid) - before, 30, "the starter forked no child")
        (child,) = _children(proc.pid) - before
        assert _children(app.pid) == set()  # the launcher started nothing itself
        # SIGTERM reaches the launcher once the child catches it, as with a cold ClientApp.
        wait_until(lambda: _catches_sigterm(app.pid), 30, "the launcher never caught SIGTERM")
        app.send_signal(signal.SIGTERM)
        assert app.wait(60) is not None
        wait_until(lambda: not _alive(child), 30, "the child outlived SIGTERM")
    finally:
        app.kill()
        app.wait(10)


def test_a_killed_launcher_takes_its_child_with_it(starter) -> None:
    proc, launcher = starter
    before = _children(proc.pid)  # a child on its way out may still be listed
    app = _blocking(launcher)
    try:
        wait_until(lambda: _children(proc.pid) - before, 30, "the starter forked no child")
        (child,) = _children(proc.pid) - before
        app.kill()  # SIGKILL: nothing forwarded, the connection just closes
        app.wait(10)
        wait_until(lambda: not _alive(child), 30, "the child outlived its launcher")
    finally:
        app.kill()
        app.wait(10)
    assert proc.poll() is None


def test_a_broken_request_is_refused_and_the_starter_goes_on(starter) -> None:
    proc, launcher = starter
    before = _children(proc.pid)  # an earlier test's child may still be on its way out
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(socket_path(launcher.parent)))
        conn.sendall(b"\x00\x00\x00\x05hello")  # no file descriptors, not JSON
        conn.settimeout(30)
        try:
            answer = conn.recv(64)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""  # closed without forking a child
    assert proc.poll() is None and not _children(proc.pid) - before  # no child forked for it
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: flwr-clientapp" in out.stdout


def test_the_starter_leaves_when_its_parent_does(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    # A shell starts the starter (naming itself as the parent to outlive), then exits.
    shell = subprocess.run(["sh", "-c", f'"{sys.executable}" -m fedmri.client.warm "{path}" $$ '
                            '>/dev/null 2>&1 & echo $!'], capture_output=True, text=True, timeout=30)
    pid = int(shell.stdout.strip())
    wait_until(lambda: not _alive(pid), 90, "the starter outlived its parent")
    assert not path.exists()


def test_a_deep_folder_gets_a_socket_path_that_fits_and_is_private(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-hospital-folder-name"] * 4, "fedmri-bin")
    path = socket_path(deep)
    assert len(str(deep / SOCKET_NAME)) > 107 and len(str(path)) <= 107
    assert path.name == SOCKET_NAME and path.parent.stat().st_mode & 0o077 == 0
    assert socket_path(deep) == path  # the launcher and the starter agree
    assert socket_path(tmp_path) == tmp_path / SOCKET_NAME
    assert str(path) in write_launcher(deep).read_text()


def test_the_starter_imports_every_stage_trainer_and_names_one_that_does_not_import(monkeypatch) -> None:
    """What :func:`serve` runs before it listens: every forked ClientApp then finds the trainers
    (MONAI, transformers) imported instead of importing them for each message."""
    asked: list[str] = []
    real, depth = importlib.import_module, [0]

    def recording(name: str, *args: object) -> object:  # the calls of preload, not those of the modules
        if not depth[0]:
            asked.append(name)
        depth[0] += 1
        try:
            return real(name, *args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(warm.importlib, "import_module", recording)
    said: list[str] = []
    with registered(StageSpec("broken-for-test", lambda cfg: None, "fedmri_no_such_module:run_it")):
        preload(said.append)
    assert asked == ["fedmri.client.trainers.pretrain", "fedmri.client.trainers.align", "fedmri.client.trainers.heads",
                     "fedmri.client.trainers.evaluate", "fedmri_no_such_module"]
    assert all(module in sys.modules for module in asked[:-1])
    assert len(said) == 1, said
    assert "fedmri_no_such_module did not import (ModuleNotFoundError" in said[0]
    assert "import it themselves" in said[0]
