"""Streaming LLM throughput at saturation through each front-end, in one run against one server.

    python -m pagedserve.benchmarks.frontend_streams --num-requests 64
    python -m pagedserve.benchmarks.frontend_streams --model llama3 --serve-args engine.load_format=dummy

One ``serve`` with ``frontends=[grpc,http,openai]``; the same standard-workload prompts (a fresh
prefix per pass, so no pass reuses another's cache) go through gRPC ``ModelStreamInfer``
(tritonclient aio), the ``openai`` front-end's streamed chat completions (the official ``openai``
async client) and HTTP ``generate_stream`` (server-sent events read with aiohttp), all requests at
once. The front-ends take turns for ``--rounds`` rounds and gRPC closes the run; each front-end's mean
output tok/s is divided by gRPC's. The clients run on the same machine, so a heavier client (the
``openai`` package) costs its front-end some of the shared CPU: the chat stream is also read with
aiohttp, the HTTP pass's client, to tell the server's cost from the package's. Each pass is split over
``--client-processes`` client processes (a quarter of the cores by default), so that where cores are
spare one Python client's parsing does not set the rate. Chat wraps each prompt
in the model's chat template; its texts are shorter by the tokens the template adds, so the model
reads the same prompt lengths in every pass; output lengths are identical (``ignore_eos``,
``max_tokens`` = the drawn length). The table also gives the ``serve`` process's CPU time per output
token in each pass: its front-ends and core, not the engine (a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pagedserve.benchmarks.ab_rounds import cpu_seconds
from pagedserve.benchmarks.serving import Prompt, Record, build_prompts, resolve_target, run_load
from rich.console import Console
from rich.table import Table

_LISTENING = re.compile(r"pagedserve: (.+?) listening on [^:]+:(\d+)")


@dataclass
class Pass:
    name: str
    records: list[Record]
    duration: float
    server_cpu: float = 0.0
    """CPU seconds the ``serve`` process itself spent on the pass (its front-ends and core; the LLM
    engine runs in a process of its own)."""

    @property
    def cpu_per_token_us(self) -> float:
        return self.server_cpu / self.output_tokens * 1e6 if self.output_tokens else 0.0

    @property
    def output_tokens(self) -> int:
        return sum(r.tokens for r in self.records if r.error is None)

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.duration if self.duration else 0.0


@dataclass
class Serve:
    model: str
    overrides: list[str]
    ports: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> Serve:
        command = [
            sys.executable,
            "-m",
            "pagedserve",
            f"model={self.model}",
            "server.host=127.0.0.1",
            "frontends=[grpc,http,openai]",
            "server.grpc_port=0",
            "server.http_port=0",
            "server.openai_port=0",
            "server.metrics_port=-1",
            *self.overrides,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = _LISTENING.search(line)
            if match:
                self.ports[match.group(1)] = int(match.group(2))
            if "READY" in line or len(self.ports) == 3 and "Models" in line:
                break
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        from pagedserve.benchmarks.grpc_overhead import wait_ready

        wait_ready(f"127.0.0.1:{self.ports['GRPCInferenceService']}", ready=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(60)


async def _openai_pass(port: int, model: str, prompts: list[Prompt]) -> tuple[list[Record], float]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600
    )
    records = [Record(p.output_len) for p in prompts]

    async def one(prompt: Prompt, record: Record) -> None:
        record.sent = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt.text}],
                max_tokens=prompt.output_len,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    record.chunks.append(now)
                if chunk.usage is not None:
                    record.tokens = chunk.usage.completion_tokens
        except Exception as error:  # noqa: BLE001 - reported in the table
            record.error = str(error)
        record.done = time.perf_counter()

    start = time.perf_counter()
    await asyncio.gather(*(one(p, r) for p, r in zip(prompts, records, strict=True)))
    await client.close()
    return records, max(r.done for r in records) - start


async def _sse_pass(
    url: str, bodies: list[dict[str, Any]], prompts: list[Prompt], count: Any
) -> tuple[list[Record], float]:
    """Server-sent events read with aiohttp; ``count(event)`` says how many tokens an event carries."""
    import aiohttp

    records = [Record(p.output_len) for p in prompts]

    async def one(session: aiohttp.ClientSession, body: dict[str, Any], record: Record) -> None:
        record.sent = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                async for line in response.content:
                    if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise RuntimeError(str(event["error"]))
                    n = count(event)
                    if n:
                        record.tokens += n
                        record.chunks.append(time.perf_counter())
        except Exception as error:  # noqa: BLE001 - reported in the table
            record.error = str(error)
        record.done = time.perf_counter()

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, b, r) for b, r in zip(bodies, records, strict=True)))
    return records, max(r.done for r in records) - start


async def _openai_raw_pass(port: int, model: str, prompts: list[Prompt]) -> tuple[list[Record], float]:
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": p.text}],
            "max_tokens": p.output_len,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        for p in prompts
    ]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    # The last chunk (empty choices) carries the request's usage.
    return await _sse_pass(url, bodies, prompts, lambda e: (e.get("usage") or {}).get("completion_tokens", 0))


async def _generate_stream_pass(port: int, model: str, prompts: list[Prompt]) -> tuple[list[Record], float]:
    bodies = [
        {
            "text_input": p.text,
            "return_num_output_tokens": True,
            "exclude_input_in_output": True,
            "parameters": {"max_tokens": p.output_len, "ignore_eos": True, "temperature": 0},
        }
        for p in prompts
    ]
    url = f"http://127.0.0.1:{port}/v2/models/{model}/generate_stream"
    return await _sse_pass(url, bodies, prompts, _generated_tokens)


def _generated_tokens(event: dict[str, Any]) -> int:
    n = event.get("num_output_tokens", 0)
    return int(n[0] if isinstance(n, list) else n)


WAYS = ("grpc", "openai chat (openai client)", "openai chat (aiohttp)", "http generate_stream")


def client_pass(
    way: str, ports: dict[str, int], model: str, prompts: list[Prompt], start_at: float
) -> list[Record]:
    """One client process's share of a pass: waits for ``start_at`` (``perf_counter``, the same clock
    in every process here) so that all shares begin together."""
    time.sleep(max(0.0, start_at - time.perf_counter()))
    if way == "grpc":
        url = f"127.0.0.1:{ports['GRPCInferenceService']}"
        return asyncio.run(run_load(url, model, prompts, float("inf"), 0, "per-request", False, 3600))[0]
    if way == "openai chat (openai client)":
        return asyncio.run(_openai_pass(ports["OpenAI API"], model, prompts))[0]
    if way == "openai chat (aiohttp)":
        return asyncio.run(_openai_raw_pass(ports["OpenAI API"], model, prompts))[0]
    if way == "http generate_stream":
        return asyncio.run(_generate_stream_pass(ports["HTTPService"], model, prompts))[0]
    raise ValueError(f"unknown front-end {way!r}")


class Clients:
    """Runs each pass's requests from ``processes`` client processes, round-robin, so that on a machine
    with cores to spare the clients' parsing is not what limits the rate (one process: in this one)."""

    def __init__(self, processes: int) -> None:
        self.pool = (
            ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
            if processes > 1
            else None
        )
        self.processes = processes

    def run(
        self, way: str, ports: dict[str, int], model: str, prompts: list[Prompt], server_pid: int
    ) -> Pass:
        cpu = cpu_seconds(server_pid)
        records = self._records(way, ports, model, prompts)
        duration = max(r.done for r in records) - min(r.sent for r in records)
        return Pass(way, records, duration, cpu_seconds(server_pid) - cpu)

    def _records(self, way: str, ports: dict[str, int], model: str, prompts: list[Prompt]) -> list[Record]:
        if self.pool is None:
            records = client_pass(way, ports, model, prompts, 0.0)
        else:
            start_at = time.perf_counter() + 0.5
            shares = [prompts[k :: self.processes] for k in range(self.processes)]
            futures = [self.pool.submit(client_pass, way, ports, model, s, start_at) for s in shares if s]
            records = [r for f in futures for r in f.result()]
        return records

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def run(
    model: str,
    overrides: list[str],
    num_requests: int,
    rounds: int,
    seed: int,
    processes: int,
    console: Console,
) -> list[Pass]:
    target = resolve_target(model, overrides)
    prompt_len, output_len = (16, 64), (16, 128)
    passes: list[Pass] = []
    clients = Clients(processes)
    with Serve(model, target.overrides) as serve:
        # A full-size untimed pass first, outputs as long as the timed ones': the engine compiles and
        # captures for the batch sizes and context lengths the timed passes reach (with short
        # outputs, the first timed round ran a third slower on the H200), and every client process
        # imports its libraries.
        warm = build_prompts(target.tokenizer, num_requests, prompt_len, output_len, seed, 1)
        for way in WAYS:
            clients.run(way, serve.ports, model, warm, serve.process.pid)
        # Rounds alternate the front-ends and gRPC closes the run, so drift shows and averages out.
        plan = [way for _ in range(rounds) for way in WAYS] + ["grpc"]
        overhead = chat_overhead(target.tokenizer)
        console.print(f"the chat template adds {overhead} tokens: chat prompts are that much shorter")
        for k, way in enumerate(plan):
            extra = overhead if way.startswith("openai chat") else 0
            prompts = build_prompts(
                target.tokenizer, num_requests, prompt_len, output_len, seed, k + 2, extra
            )
            console.print(f"{way}: {len(prompts)} requests at once from {processes} client process(es)")
            passes.append(clients.run(way, serve.ports, model, prompts, serve.process.pid))
    clients.close()
    return passes


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the model's chat template adds around one user message (its role markers, the
    generation prompt), counted as the ``openai`` front-end tokenizes a rendered chat."""
    from pagedserve.chat_template import ChatTemplate

    text = " the the the"
    rendered = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens).render(
        [{"role": "user", "content": text}]
    )
    return len(tokenizer.encode(rendered, add_special_tokens=False)) - len(tokenizer.encode(text))


def report(passes: list[Pass], console: Console) -> Table:
    table = Table(title="Streaming output tok/s at saturation, one server, same run")
    columns = (
        "front-end",
        "passes",
        "requests ok",
        "output tok/s (each pass)",
        "mean",
        "÷ gRPC",
        "server CPU µs/token",
    )
    for column in columns:
        table.add_column(column, justify="right")
    by_way: dict[str, list[Pass]] = {}
    for p in passes:
        by_way.setdefault(p.name, []).append(p)
    means = {name: sum(p.throughput for p in group) / len(group) for name, group in by_way.items()}
    for name, group in by_way.items():
        ok = sum(1 for p in group for r in p.records if r.error is None)
        each = ", ".join(f"{p.throughput:,.0f}" for p in group)
        table.add_row(
            name,
            str(len(group)),
            f"{ok}/{sum(len(p.records) for p in group)}",
            each,
            f"{means[name]:,.0f}",
            f"{means[name] / means['grpc']:.2f}",
            ", ".join(f"{p.cpu_per_token_us:.0f}" for p in group),
        )
    errors = sorted({r.error for p in passes for r in p.records if r.error})[:3]
    if errors:
        table.caption = "errors: " + " | ".join(errors)
    console.print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-args", nargs="*", default=[])
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 1) // 4)),
        help="client processes sharing each pass (default: a quarter of the cores, 1 to 8)",
    )
    args = parser.parse_args(argv)
    console = Console(width=160)
    passes = run(
        args.model, args.serve_args, args.num_requests, args.rounds, args.seed, args.client_processes, console
    )
    report(passes, console)


if __name__ == "__main__":
    main()
