"""A/B rounds for the request-rate benchmarks (``grpc_overhead``, ``http_infer``).

Every server (pagedserve, its ``--variant`` copies, and a bare peer) is a subprocess; the same client
drives each at every concurrency for the same time. Cells alternate round after round, the servers'
order rotating each round, and each pagedserve figure is a ratio to the peer's figure of the same
round, so a busy machine slows both sides alike. Besides req/s, each cell records the server's CPU
time per request (its process's user + system time over the cell), which moves less with the load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.table import Table

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

Measure = Callable[[int, float], tuple[float, float]]
"""(concurrency, seconds) -> (requests/s, requests)."""


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


def round_parser(description: str | None) -> argparse.ArgumentParser:
    """A command line with the options every A/B benchmark takes: concurrencies, seconds per cell,
    rounds and ``--variant`` servers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--variant", type=parse_variant, action="append", default=[], metavar='"NAME=PATH ..."'
    )
    return parser


def variants_of(args: argparse.Namespace) -> dict[str, Variant]:
    """This code as "pagedserve", then the ``--variant`` servers."""
    return {"pagedserve": Variant(None), **dict(args.variant)}


def parse_variant(text: str) -> tuple[str, Variant]:
    """``--variant "NAME=PATH [override ...]"`` (an empty PATH: this code)."""
    head, *overrides = text.split()
    name, sep, path = head.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH [override ...], got {text!r}")
    return name, Variant(path or None, overrides)


def start_process(
    command: list[str], port: re.Pattern[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start ``command`` and return it with the port of its first output line ``port`` matches."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        match = port.search(line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError(f"{command} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def span(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    if len(values) == 1:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    measure: Measure
    rates: dict[int, list[float]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)

    def cell(self, concurrency: int, seconds: float) -> None:
        before = cpu_seconds(self.process.pid)
        rate, requests = self.measure(concurrency, seconds)
        used = cpu_seconds(self.process.pid) - before
        self.rates.setdefault(concurrency, []).append(rate)
        self.cpu_us.setdefault(concurrency, []).append(used / max(requests, 1) * 1e6)


def alternate(servers: list[Server], concurrencies: list[int], seconds: float, rounds: int) -> None:
    """Measure every cell ``rounds`` times, rotating the servers' order each round; stop them after."""
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


def ratio_table(title: str, servers: list[Server], bare: str, concurrencies: list[int]) -> Table:
    """req/s, the ratio to the server named ``bare`` round by round, and CPU µs per request."""
    peer = next(s for s in servers if s.name == bare)
    table = Table(title=title)
    for column in ("concurrency", "server", "req/s", "ratio to bare", "server CPU µs/request"):
        table.add_column(column, justify="right")
    for concurrency in concurrencies:
        for server in servers:
            ratios = [
                mine / theirs
                for mine, theirs in zip(server.rates[concurrency], peer.rates[concurrency], strict=True)
            ]
            ratio = "" if server is peer else span(ratios, 2)
            row = (str(concurrency), server.name, span(server.rates[concurrency]), ratio)
            table.add_row(*row, span(server.cpu_us[concurrency]))
    return table
