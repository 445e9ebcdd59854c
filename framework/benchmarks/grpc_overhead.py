"""ModelInfer requests/s on ``simple`` through tritonclient: pagedserve vs a bare grpcio server.

All servers run as subprocesses on this machine, measured in alternating rounds with their CPU time
per request (:mod:`pagedserve.benchmarks.ab_rounds`).

``--variant "NAME=PATH [override ...]"`` adds a pagedserve whose ``pagedserve`` and
``pagedserve_plugins`` packages are imported from PATH (empty: this code), started with the extra
overrides: an A/B against another copy of the code or another setting, in the same run.
Run: ``python -m pagedserve.benchmarks.grpc_overhead``.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
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

_PORT = re.compile(r"listening on [^:]+:(\d+)")
BARE = "bare grpcio"


def start(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    process, port = start_process(command, _PORT, env)
    return process, f"127.0.0.1:{port}"


def wait_ready(url: str, ready: bool) -> None:
    """Wait until ``url`` accepts connections (and, for pagedserve, reports ready)."""
    import grpc
    import tritonclient.grpc as grpcclient

    with grpc.insecure_channel(url) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    client = grpcclient.InferenceServerClient(url)
    for _ in range(600):
        if not ready or client.is_server_ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} never became ready")


def measure(url: str, concurrency: int, seconds: float) -> float:
    """Requests/s with ``concurrency`` client threads, each with its own channel."""
    return _measure(url, concurrency, seconds)[0]


def _measure(url: str, concurrency: int, seconds: float) -> tuple[float, int]:
    """(requests/s, requests) with ``concurrency`` client threads, each with its own channel."""
    import tritonclient.grpc as grpcclient

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    counts = [0] * concurrency
    ready = threading.Barrier(concurrency + 1)
    stop = [0.0]

    def worker(slot: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = [
            grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
            grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(np.ones_like(a))
        client.infer("simple", inputs)  # warm-up: connect before the clock starts
        ready.wait()
        while time.monotonic() < stop[0]:
            client.infer("simple", inputs)
            counts[slot] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    stop[0] = time.monotonic() + 3600
    ready.wait()
    start_time = time.monotonic()
    stop[0] = start_time + seconds
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - start_time), sum(counts)


def _pagedserve_command(serve_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pagedserve",
        "model=simple",
        "server.grpc_port=0",
        "frontends=[grpc]",
        "server.host=127.0.0.1",
    ] + serve_args


def _start_servers(variants: dict[str, Variant], serve_args: list[str]) -> list[Server]:
    started = [
        (name, *start(_pagedserve_command(serve_args + variant.overrides), variant.environment()))
        for name, variant in variants.items()
    ]
    started.append((BARE, *start([sys.executable, "-m", "pagedserve.benchmarks.bare_server", "0"])))
    for name, _, url in started:
        wait_ready(url, ready=name != BARE)
    return [Server(name, process, functools.partial(_measure, url)) for name, process, url in started]


def run(
    concurrencies: list[int],
    seconds: float,
    print_table: Callable[[Table], None],
    rounds: int = 1,
    variants: dict[str, Variant] | None = None,
    serve_args: list[str] | None = None,
) -> list[Server]:
    servers = _start_servers(variants or {"pagedserve": Variant(None)}, serve_args or [])
    alternate(servers, concurrencies, seconds, rounds)
    title = (
        f"ModelInfer on 'simple' via tritonclient ({seconds:g} s per cell, {rounds} round(s); "
        "median (min–max))"
    )
    print_table(ratio_table(title, servers, BARE, concurrencies))
    return servers


def main() -> None:
    parser = round_parser(__doc__)
    parser.add_argument("--serve-args", nargs="*", default=[], help="extra overrides for every pagedserve")
    args = parser.parse_args()
    print_table = Console(width=160).print
    run(args.concurrency, args.seconds, print_table, args.rounds, variants_of(args), args.serve_args)


if __name__ == "__main__":
    main()
