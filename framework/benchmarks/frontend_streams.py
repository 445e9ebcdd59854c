"""Streaming LLM throughput at saturation through each front-end, in one run against one server.

    python -m pagedserve.benchmarks.frontend_streams --num-requests 64
    python -m pagedserve.benchmarks.frontend_streams --model llama3 --serve-args engine.load_format=dummy

One ``serve`` with ``frontends=[grpc,http,openai]``; the same standard-workload prompts (a fresh
prefix per pass, so no pass reuses another's cache) go through gRPC ``ModelStreamInfer``
(tritonclient aio), the ``openai`` front-end's streamed chat completions (the official ``openai``
async client) and HTTP ``generate_stream`` (server-sent events read with aiohttp), all requests at
once. gRPC runs first and last; each other front-end's output tok/s is divided by the mean of the two
gRPC passes. Chat wraps each prompt in the model's chat template, so its prompts are a few tokens
longer; output lengths are identical (``ignore_eos``, ``max_tokens`` = the drawn length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pagedserve.benchmarks.serving import Prompt, Record, build_prompts, resolve_target, run_load
from rich.console import Console
from rich.table import Table

_LISTENING = re.compile(r"pagedserve: (.+?) listening on [^:]+:(\d+)")


@dataclass
class Pass:
    name: str
    records: list[Record]
    duration: float

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


async def _generate_stream_pass(port: int, model: str, prompts: list[Prompt]) -> tuple[list[Record], float]:
    import aiohttp

    records = [Record(p.output_len) for p in prompts]
    url = f"http://127.0.0.1:{port}/v2/models/{model}/generate_stream"

    async def one(session: aiohttp.ClientSession, prompt: Prompt, record: Record) -> None:
        body = {
            "text_input": prompt.text,
            "return_num_output_tokens": True,
            "exclude_input_in_output": True,
            "parameters": {"max_tokens": prompt.output_len, "ignore_eos": True, "temperature": 0},
        }
        record.sent = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    n = event.get("num_output_tokens", 0)
                    n = n[0] if isinstance(n, list) else n
                    if n:
                        record.tokens += int(n)
                        record.chunks.append(time.perf_counter())
        except Exception as error:  # noqa: BLE001 - reported in the table
            record.error = str(error)
        record.done = time.perf_counter()

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, p, r) for p, r in zip(prompts, records, strict=True)))
    return records, max(r.done for r in records) - start


def run(model: str, overrides: list[str], num_requests: int, seed: int, console: Console) -> list[Pass]:
    target = resolve_target(model, overrides)
    prompt_len, output_len = (16, 64), (16, 128)
    sets = [
        build_prompts(target.tokenizer, num_requests, prompt_len, output_len, seed, k + 1) for k in range(5)
    ]
    warm = build_prompts(target.tokenizer, min(num_requests, 16), prompt_len, (2, 6), seed + 1)
    passes: list[Pass] = []
    with Serve(model, target.overrides) as serve:
        grpc_url = f"127.0.0.1:{serve.ports['GRPCInferenceService']}"
        asyncio.run(run_load(grpc_url, model, warm, float("inf"), seed, "per-request", False, 3600))
        plan = [
            ("grpc", lambda p: _grpc(grpc_url, model, p, seed)),
            ("openai chat", lambda p: asyncio.run(_openai_pass(serve.ports["OpenAI API"], model, p))),
            (
                "http generate_stream",
                lambda p: asyncio.run(_generate_stream_pass(serve.ports["HTTPService"], model, p)),
            ),
            ("grpc (again)", lambda p: _grpc(grpc_url, model, p, seed)),
        ]
        for (name, go), prompts in zip(plan, sets, strict=False):
            console.print(f"{name}: {len(prompts)} requests at once")
            records, duration = go(prompts)
            passes.append(Pass(name, records, duration))
    return passes


def _grpc(url: str, model: str, prompts: list[Prompt], seed: int) -> tuple[list[Record], float]:
    records, duration, _ = asyncio.run(
        run_load(url, model, prompts, float("inf"), seed, "per-request", False, 3600)
    )
    return records, duration


def report(passes: list[Pass], console: Console) -> Table:
    grpc = [p.throughput for p in passes if p.name.startswith("grpc")]
    reference = sum(grpc) / len(grpc)
    table = Table(title="Streaming output tok/s at saturation, one server, same run")
    for column in ("front-end", "requests ok", "output tokens", "duration s", "output tok/s", "÷ gRPC"):
        table.add_column(column, justify="right")
    for p in passes:
        ok = sum(1 for r in p.records if r.error is None)
        table.add_row(
            p.name,
            f"{ok}/{len(p.records)}",
            str(p.output_tokens),
            f"{p.duration:.2f}",
            f"{p.throughput:,.0f}",
            f"{p.throughput / reference:.2f}",
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-args", nargs="*", default=[])
    args = parser.parse_args(argv)
    console = Console(width=160)
    report(run(args.model, args.serve_args, args.num_requests, args.seed, console), console)


if __name__ == "__main__":
    main()
