"""HTTP ``/infer`` requests/s on ``simple``: pagedserve's ``http`` front-end vs a bare uvicorn +
starlette app answering the same route with a canned response.

Both servers run as subprocesses; the same client (threads with keep-alive ``http.client``
connections, posting the same JSON body) drives each at every concurrency for the same time.
Run: ``python -m pagedserve.benchmarks.http_infer`` (``--bare`` runs the peer alone).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

_PORT = re.compile(r"(?:HTTPService|bare app) listening on [^:]+:(\d+)")
ROUTE = "/v2/models/simple/infer"
REQUEST = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
).encode()
RESPONSE = json.dumps(
    {
        "model_name": "simple",
        "model_version": "1",
        "outputs": [
            {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(1, 17))},
            {"name": "OUTPUT1", "datatype": "INT32", "shape": [1, 16], "data": list(range(-1, 15))},
        ],
    },
    separators=(",", ":"),
).encode()


def bare_app() -> None:
    """The peer: uvicorn + starlette, one route reading the body and answering the canned JSON."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        await request.body()
        return Response(RESPONSE, media_type="application/json")

    app = Starlette(routes=[Route(ROUTE, infer, methods=["POST"])])
    # proto=IPPROTO_TCP, as getaddrinfo gives pagedserve: asyncio sets TCP_NODELAY only on such sockets,
    # and without it every response waits out the client's delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    print(f"bare app listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def start(command: list[str]) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = _PORT.search(line)
        if match:
            threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return process, int(match.group(1))
    raise RuntimeError(f"{command} did not start")


def post(connection: http.client.HTTPConnection) -> None:
    connection.request("POST", ROUTE, body=REQUEST, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")


def wait_ready(port: int) -> None:
    for _ in range(600):
        try:
            post(http.client.HTTPConnection("127.0.0.1", port, timeout=5))
            return
        except (OSError, RuntimeError):
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never answered {ROUTE}")


def measure(port: int, concurrency: int, seconds: float) -> float:
    """Requests/s with ``concurrency`` client threads, each with its own keep-alive connection."""
    counts = [0] * concurrency
    stop = time.monotonic() + seconds

    def worker(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        post(connection)  # warm-up
        while time.monotonic() < stop:
            post(connection)
            counts[slot] += 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start_time = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - start_time)


def run(
    concurrencies: list[int], seconds: float, print_table: Callable[[Table], None]
) -> list[tuple[int, float, float]]:
    ours, our_port = start(
        [
            sys.executable,
            "-m",
            "pagedserve",
            "model=simple",
            "frontends=[http]",
            "server.http_port=0",
            "server.metrics_port=-1",
            "server.host=127.0.0.1",
        ]
    )
    bare, bare_port = start([sys.executable, "-m", "pagedserve.benchmarks.http_infer", "--bare"])
    try:
        wait_ready(our_port)
        wait_ready(bare_port)
        rows = [(c, measure(our_port, c, seconds), measure(bare_port, c, seconds)) for c in concurrencies]
    finally:
        for process in (ours, bare):
            process.terminate()
            process.wait(10)
    table = Table(
        title=f"HTTP /infer on 'simple', JSON tensors, keep-alive http.client ({seconds:.0f} s per cell)"
    )
    for column in ("concurrency", "pagedserve req/s", "bare uvicorn+starlette req/s", "ratio"):
        table.add_column(column, justify="right")
    for concurrency, mine, peer in rows:
        table.add_row(str(concurrency), f"{mine:,.0f}", f"{peer:,.0f}", f"{mine / peer:.2f}")
    print_table(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bare", action="store_true", help="run only the bare peer app")
    args = parser.parse_args()
    if args.bare:
        bare_app()
        return
    run(args.concurrency, args.seconds, Console().print)


if __name__ == "__main__":
    main()
