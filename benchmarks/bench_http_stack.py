"""How fast the HTTP stack under Flower 1.42's SuperLink moves 5 MB objects on this machine.

Flower 1.42 carries every message between ServerApp, SuperLink, SuperNode and ClientApp over
HTTP: FastAPI on uvicorn (httptools, uvloop) behind TLS, and an ``httpx`` client, with the
arrays cut into 5 MB objects. ``bench_deploy_base.py --trace`` finds the SuperLink's single core
to be the bottleneck of a base round's transfers. This script measures the same stack shape
without Flower: a uvicorn server with TLS and ``--middlewares`` pass-through Starlette
``BaseHTTPMiddleware`` layers (plus one that reads the body, as Flower's protobuf middleware
does), and an ``httpx`` client sending 5 MB bodies (push) and fetching 5 MB responses (pull) on
2 threads, as Flower's object transfer does. It prints MB/s both ways and the server's CPU
seconds per MB received; compare the latter with the SuperLink's in ``bench_deploy_base.py``.

    python benchmarks/bench_http_stack.py
    python benchmarks/bench_http_stack.py --objects 120 --middlewares 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import cpu_seconds

OBJECT = 5 * 2**20  # Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

SERVER = """
import os, sys
import uvicorn
from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

app = FastAPI()
blob = os.urandom({size})

class Pass(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        return await call_next(request)

class Body(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        request.state.body = await request.body()
        return await call_next(request)

@app.post("/push")
async def push(request: Request):
    return Response(content=str(len(request.state.body)).encode())

@app.post("/pull")
async def pull(request: Request):
    return Response(content=blob)

app.add_middleware(Body)
for _ in range({middlewares}):
    app.add_middleware(Pass)
uvicorn.run(app, host="127.0.0.1", port={port}, ssl_keyfile=sys.argv[1], ssl_certfile=sys.argv[2],
            log_level="warning", loop="uvloop", http="httptools")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=90, help="5 MB objects each way (90: one base update)")
    parser.add_argument("--middlewares", type=int, default=4, help="pass-through BaseHTTPMiddleware layers")
    args = parser.parse_args()
    import httpx

    from fedmri.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_authority

    with tempfile.TemporaryDirectory() as tmp:
        folder = init_authority(Path(tmp) / "certs", ["127.0.0.1"], []).folder
        key, cert, ca = folder / SERVER_KEY, folder / SERVER_CERT, folder / CA_CERT
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = Path(tmp) / "server.py"
        script.write_text(SERVER.format(size=OBJECT, middlewares=args.middlewares, port=port))
        server = subprocess.Popen([sys.executable, str(script), str(key), str(cert)])
        client = httpx.Client(verify=str(ca), timeout=60)
        try:
            url = f"https://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.post(url + "/push", content=b"x").raise_for_status()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.2)
            body = os.urandom(OBJECT)
            mb = args.objects * OBJECT / 1e6
            with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Flower pushes and pulls 2 at a time
                for way, path, content in (("push", "/push", body), ("pull", "/pull", b"x")):
                    cpu, t = cpu_seconds(server.pid), time.perf_counter()
                    for reply in pool.map(lambda _: client.post(url + path, content=content), range(args.objects)):
                        reply.raise_for_status()
                    wall, used = time.perf_counter() - t, cpu_seconds(server.pid) - cpu
                    print(f"{way}: {mb:.0f} MB in {wall:.1f} s = {mb / wall:.0f} MB/s; server CPU {used:.1f} s "
                          f"= {1000 * used / mb:.1f} ms per MB", flush=True)
        finally:
            client.close()  # uvicorn waits for open keep-alive connections before it exits
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"({args.middlewares} pass-through middlewares + 1 reading the body; TLS; client and server on "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
