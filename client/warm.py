"""Warm ClientApp processes: each ClientApp is forked from a process that has already imported fedmri.

Flower starts one ``flwr-clientapp`` process per message a site receives, and a
new process spends seconds of CPU importing torch, Flower and fedmri before it
reads its message (4.5 s on a quiet 2-core machine). A secure-aggregation round
is four messages per site, so a site paid that four times a round.

``fedmri client start`` therefore runs a *warm starter* beside the SuperNode
(:func:`serve`, ``python -m fedmri.client.warm SOCKET``). It imports the installed
``fedmri.client.app`` with the bundle guard (:func:`fedmri.client.guard.install_guard`,
the guard's step 1, before any bundle folder is on ``sys.path``) and the stage
trainers (:func:`preload`: MONAI and transformers), then waits on a
Unix socket in the site's Flower home, readable by the site's user only.

The ``flwr-clientapp`` that Flower's SuperExec starts is then fedmri's launcher
(:func:`launch`, standard library only, so it starts in milliseconds). It hands the
starter its arguments, environment, working folder and standard streams (passed as
file descriptors), and the starter forks a child that runs Flower's ClientApp with
the guard, exactly as a cold ``flwr-clientapp`` would. The launcher stays in
the ClientApp's place for Flower and for the site's reaper:

- it forwards SIGTERM and SIGINT to the child, and catches them only once the child
  has installed Flower's own handlers (as a cold ClientApp would: the reaper waits
  for that before it stops one);
- it exits with the child's exit code;
- if the launcher dies (SIGKILL), the child sees its connection close and kills itself.

Without a starter (none running, or it fails before forking) the launcher runs the
ClientApp itself, cold, as before.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

SOCKET_NAME = "clientapp.sock"
_UNIX_PATH_MAX = 107  # a Unix socket's path holds 108 bytes, its terminating NUL included
# Child -> launcher, one line each: its pid; Flower's signal handlers are in place; its exit code.
_PID, _READY, _EXIT = b"P", b"R", b"X"
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 16 * 1024 * 1024


# --- the launcher (standard library only: it runs for every ClientApp) -------------------------

def launch(path: str, cold: Any) -> None:
    """Run this ClientApp in a child of the warm starter at ``path``; else call ``cold()``.

    Exits with the child's exit code (1 if it died without one).
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        payload = json.dumps({"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
        conn.sendall(payload)
        lines = conn.makefile("rb")
        first = lines.readline()
    except OSError:
        first = b""
    if not first.startswith(_PID):  # no starter, or it could not fork: run it here
        conn.close()
        cold()
        return
    child = int(first[1:])

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    code = 1
    for line in lines:
        if line.startswith(_READY):
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, forward)
        elif line.startswith(_EXIT):
            code = int(line[1:])
            break
    sys.exit(code)


def socket_path(folder: Path) -> Path:
    """Where the starter for the launcher in ``folder`` listens: beside it, or where the path fits.

    A Unix socket's path is at most 107 bytes; a site's Flower home can be deeper. Then the
    socket goes in a folder of the temp dir named after ``folder``, private to this user.
    """
    path = folder / SOCKET_NAME
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        return path
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"fedmri-{os.getuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    info = short.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:  # not ours alone: no warm starts, cold ones
        return path
    return short / SOCKET_NAME


def write_script(folder: Path, name: str) -> Path:
    """``folder/name``: the launcher as a script run by this interpreter, for the starter at :func:`socket_path`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        f"#!{sys.executable}\n"
        "# Written by `fedmri client start`: Flower's ClientApp, forked from fedmri's warm starter\n"
        "# (fedmri.client.warm), or run here with fedmri's bundle checks (fedmri.client.guard).\n"
        "from fedmri.client.warm import launch\n\n\n"
        "def cold():\n"
        "    from fedmri.client.guard import main\n\n"
        "    main()\n\n\n"
        f"launch({str(socket_path(folder))!r}, cold)\n", encoding="utf-8")
    path.chmod(0o755)
    return path


# --- the starter ---------------------------------------------------------------------------------

def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    if len(header) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a malformed request")
    size = _HEADER.unpack(header)[0]
    if size > _MAX_REQUEST:
        raise ValueError(f"a request of {size} bytes")
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("a request cut short")
        data += chunk
    request = json.loads(data)
    if not (isinstance(request.get("argv"), list) and isinstance(request.get("env"), dict)):
        raise ValueError("a request without argv and env")
    return request, fds


def _child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the launcher's ClientApp, tell it how things go, never return."""
    forked_at, code = time.time(), 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request.get("cwd") or "/")
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        sys.argv = [str(a) for a in request["argv"]]

        def tell(what: bytes) -> None:
            try:
                conn.sendall(what + b"\n")
            except OSError:
                pass

        def watch() -> None:  # the launcher is gone (killed): so is this ClientApp
            while True:
                try:
                    if not conn.recv(64):
                        break
                except OSError:
                    break
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True).start()
        tell(_PID + str(os.getpid()).encode())
        from fedmri import trace

        trace.event("clientapp-imported", started=forked_at, warm=1)  # nothing left to import
        from flwr.supernode.runtime import run_clientapp as runtime

        register = runtime.register_signal_handlers

        def register_and_tell(*args: Any, **kwargs: Any) -> Any:
            out = register(*args, **kwargs)
            tell(_READY)
            return out

        runtime.register_signal_handlers = register_and_tell
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        try:
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        tell(_EXIT + str(code).encode())
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the starter
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def preload(say: Any) -> None:
    """Import the stage trainers here, once, so that every forked ClientApp finds them imported.

    They are lazy in :mod:`fedmri.client.app` (MONAI, with everything its package imports, and
    transformers: 4.9 s of CPU on a quiet core, 4,000 modules), and a ClientApp that imported them
    itself paid that for every message it answered. A trainer that fails to import here is left
    to the round that needs it, which reports the error to the coordinator as before.
    """
    from fedmri.stages import trainer_modules

    for module in trainer_modules():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - the round that needs it says why
            say(f"warm ClientApp starter: {module} did not import ({type(exc).__name__}: {exc}); "
                "the rounds that need it import it themselves")


def serve(path: Path, parent: int | None = None, say: Any = None) -> None:
    """Import the ClientApp, then fork one child per launcher that connects to ``path``, until ``parent`` goes.

    Runs single-threaded (a fork copies only the calling thread). ``parent`` is the process
    it serves (the site daemon; by default the one that started it): once this process is
    no longer its child, it stops.
    """
    say = say or (lambda line: print(f"fedmri: {line}", file=sys.stderr, flush=True))
    parent = os.getppid() if parent is None else parent
    from fedmri.client.guard import install_guard

    install_guard()
    importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # once here, not in every child
    import torch

    preload(say)

    if torch.cuda.is_initialized():  # a forked child cannot use a CUDA context made before the fork
        say("warm ClientApp starter: CUDA was initialised on import; ClientApps start cold")
        return

    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)  # the socket is the site user's only
    try:
        listener.bind(str(path))
    except OSError as exc:
        say(f"warm ClientApp starter: cannot listen at {path} ({exc}); ClientApps start cold")
        listener.close()
        return
    finally:
        os.umask(old_mask)
    listener.listen(16)
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel

    def leave(*_: object) -> None:  # children reset this
        # At once: finalising an interpreter that holds MONAI and transformers takes 2 s, and the
        # daemon waits for it while it stops.
        path.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    say(f"warm ClientApp starter ready at {path}")
    try:
        while os.getppid() == parent:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(10.0)
                request, fds = _receive(conn)
                conn.settimeout(None)
            except (OSError, ValueError) as exc:
                say(f"warm ClientApp starter: ignored {exc}")
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
