"""ModelInfer requests/s on ``simple`` through tritonclient: pagedserve vs a bare grpcio server.

All servers run as subprocesses on this machine; the same client code drives each at every
concurrency for the same time. Cells alternate (round after round, the order of the servers rotating
each round), and each pagedserve figure is a ratio to the bare server's figure of the same round, so a
busy machine slows both sides alike. Besides req/s, the table gives each server's CPU time per
request (its process's user + system time over the cell), which moves less with the machine's load.

``--variant "NAME=PATH [override ...]"`` adds a pagedserve whose ``pagedserve`` and
``pagedserve_plugins`` packages are imported from PATH (empty: this code), started with the extra
overrides: an A/B against another copy of the code or another setting, in the same run.
Run: ``python -m pagedserve.benchmarks.grpc_overhead``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

_PORT = re.compile(r"listening on [^:]+:(\d+)")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
BARE = "bare grpcio"


def start(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    url: str
    rates: dict[int, list[float]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)

    def cell(self, concurrency: int, seconds: float) -> None:
        before = _cpu_seconds(self.process.pid)
        rate, requests = _measure(self.url, concurrency, seconds)
        used = _cpu_seconds(self.process.pid) - before
        self.rates.setdefault(concurrency, []).append(rate)
        self.cpu_us.setdefault(concurrency, []).append(used / max(requests, 1) * 1e6)


@dataclass
class Variant:
    path: str | None
    """Where its ``pagedserve`` packages come from; None: this code."""
    overrides: list[str] = field(default_factory=list)

    def environment(self) -> dict[str, str] | None:
        """The server's environment: its ``path`` first on PYTHONPATH (None: inherit ours)."""
        if self.path is None:
            return None
        paths = [self.path, os.environ.get("PYTHONPATH")]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


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
    servers = []
    for name, variant in variants.items():
        command = _pagedserve_command(serve_args + variant.overrides)
        servers.append(Server(name, *start(command, variant.environment())))
    servers.append(Server(BARE, *start([sys.executable, "-m", "pagedserve.benchmarks.bare_server", "0"])))
    for server in servers:
        wait_ready(server.url, ready=server.name != BARE)
    return servers


def run(
    concurrencies: list[int],
    seconds: float,
    print_table: Callable[[Table], None],
    rounds: int = 1,
    variants: dict[str, Variant] | None = None,
    serve_args: list[str] | None = None,
) -> list[Server]:
    servers = _start_servers(variants or {"pagedserve": Variant(None)}, serve_args or [])
    try:
        for round_index in range(rounds):
            for concurrency in concurrencies:
                shift = round_index % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    server.cell(concurrency, seconds)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(10)
    print_table(_table(servers, concurrencies, seconds, rounds))
    return servers


def _span(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    if len(values) == 1:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


def _table(servers: list[Server], concurrencies: list[int], seconds: float, rounds: int) -> Table:
    bare = next(s for s in servers if s.name == BARE)
    table = Table(
        title=f"ModelInfer on 'simple' via tritonclient ({seconds:g} s per cell, {rounds} round(s); "
        "median (min–max))"
    )
    for column in ("concurrency", "server", "req/s", "ratio to bare", "server CPU µs/request"):
        table.add_column(column, justify="right")
    for concurrency in concurrencies:
        for server in servers:
            ratios = [
                mine / peer
                for mine, peer in zip(server.rates[concurrency], bare.rates[concurrency], strict=True)
            ]
            ratio = "" if server is bare else _span(ratios, 2)
            row = (str(concurrency), server.name, _span(server.rates[concurrency]), ratio)
            table.add_row(*row, _span(server.cpu_us[concurrency]))
    return table


def _variant(text: str) -> tuple[str, Variant]:
    head, *overrides = text.split()
    name, sep, path = head.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH [override ...], got {text!r}")
    return name, Variant(path or None, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar='"NAME=PATH ..."')
    parser.add_argument("--serve-args", nargs="*", default=[], help="extra overrides for every pagedserve")
    args = parser.parse_args()
    variants = {"pagedserve": Variant(None)}
    variants.update(args.variant)
    run(args.concurrency, args.seconds, Console(width=160).print, args.rounds, variants, args.serve_args)


if __name__ == "__main__":
    main()
