"""ModelInfer requests/s on ``simple`` through tritonclient: pagedserve vs a bare grpcio server.

Both servers run as subprocesses on this machine; the same client code drives each at every
concurrency for the same time. Run: ``python -m pagedserve.benchmarks.grpc_overhead``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

_PORT = re.compile(r"listening on [^:]+:(\d+)")


def start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = _PORT.search(line)
        if match:
            threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return process, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError(f"{command[0]} did not start")


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
    import tritonclient.grpc as grpcclient

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    counts = [0] * concurrency
    stop = time.monotonic() + seconds

    def worker(slot: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = [
            grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
            grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(np.ones_like(a))
        client.infer("simple", inputs)  # warm-up
        while time.monotonic() < stop:
            client.infer("simple", inputs)
            counts[slot] += 1

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
    ours, our_url = start(
        [sys.executable, "-m", "pagedserve", "model=simple", "server.grpc_port=0", "server.host=127.0.0.1"]
    )
    bare, bare_url = start([sys.executable, "-m", "pagedserve.benchmarks.bare_server", "0"])
    try:
        wait_ready(our_url, ready=True)
        wait_ready(bare_url, ready=False)
        rows = []
        for concurrency in concurrencies:
            rows.append(
                (concurrency, measure(our_url, concurrency, seconds), measure(bare_url, concurrency, seconds))
            )
    finally:
        for process in (ours, bare):
            process.terminate()
            process.wait(10)
    table = Table(title=f"ModelInfer on 'simple' via tritonclient ({seconds:.0f} s per cell)")
    for column in ("concurrency", "pagedserve req/s", "bare grpcio req/s", "ratio"):
        table.add_column(column, justify="right")
    for concurrency, mine, peer in rows:
        table.add_row(str(concurrency), f"{mine:,.0f}", f"{peer:,.0f}", f"{mine / peer:.2f}")
    print_table(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    run(args.concurrency, args.seconds, Console().print)


if __name__ == "__main__":
    main()
