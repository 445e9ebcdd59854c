"""HTTP ``/infer`` requests/s on ``simple``: pagedserve's ``http`` front-end vs a bare uvicorn +
starlette app answering the same route with a canned response.

Both servers run as subprocesses; the same client (threads with keep-alive ``http.client``
connections, posting the same JSON body) drives each at every concurrency for the same time.
Run: ``python -m pagedserve.benchmarks.http_infer`` (``--bare`` runs the peer alone).
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from pagedserve.benchmarks.ab_rounds import (
    Server,
    Variant,
    alternate,
    ratio_table,
    round_parser,
    start_process,
    variants_of,
)
from rich.console import Console
from rich.table import Table

BARE = "bare uvicorn+starlette"
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


def start(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    return start_process(command, _PORT, env)


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


def _start_servers(variants: dict[str, Variant]) -> list[Server]:
    started = [
        (name, *start(_pagedserve_command(variant.overrides), variant.environment()))
        for name, variant in variants.items()
    ]
    started.append((BARE, *start([sys.executable, "-m", "pagedserve.benchmarks.http_infer", "--bare"])))
    for _, _, port in started:
        wait_ready(port)
    return [Server(name, process, functools.partial(_measure, port)) for name, process, port in started]


def _measure(port: int, concurrency: int, seconds: float) -> tuple[float, float]:
    rate = measure(port, concurrency, seconds)
    return rate, rate * seconds


def _pagedserve_command(overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pagedserve",
        "model=simple",
        "frontends=[http]",
        "server.http_port=0",
        "server.metrics_port=-1",
        "server.host=127.0.0.1",
        *overrides,
    ]


def run(
    concurrencies: list[int],
    seconds: float,
    print_table: Callable[[Table], None],
    rounds: int = 1,
    variants: dict[str, Variant] | None = None,
) -> list[Server]:
    servers = _start_servers(variants or {"pagedserve": Variant(None)})
    alternate(servers, concurrencies, seconds, rounds)
    title = (
        f"HTTP /infer on 'simple', JSON tensors, keep-alive http.client ({seconds:g} s per cell, "
        f"{rounds} round(s); median (min–max))"
    )
    print_table(ratio_table(title, servers, BARE, concurrencies))
    return servers


def main() -> None:
    parser = round_parser(__doc__)
    parser.add_argument("--bare", action="store_true", help="run only the bare peer app")
    args = parser.parse_args()
    if args.bare:
        bare_app()
        return
    run(args.concurrency, args.seconds, Console(width=160).print, args.rounds, variants_of(args))


if __name__ == "__main__":
    main()
