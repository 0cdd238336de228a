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
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "key.pem", folder / "cert.pem"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=90, help="5 MB objects each way (90: one base update)")
    parser.add_argument("--middlewares", type=int, default=4, help="pass-through BaseHTTPMiddleware layers")
    args = parser.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        key, cert = _certificate(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = Path(tmp) / "server.py"
        script.write_text(SERVER.format(size=OBJECT, middlewares=args.middlewares, port=port))
        server = subprocess.Popen([sys.executable, str(script), str(key), str(cert)])
        client = httpx.Client(verify=str(cert), timeout=60)
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
                    cpu, t = _cpu_s(server.pid), time.perf_counter()
                    for reply in pool.map(lambda _: client.post(url + path, content=content), range(args.objects)):
                        reply.raise_for_status()
                    wall, used = time.perf_counter() - t, _cpu_s(server.pid) - cpu
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
