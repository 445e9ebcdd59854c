"""Online serving benchmark: a streaming tritonclient load generator against our gRPC server.

    python -m pagedserve.benchmarks.serving --num-requests 64 --rates 2 8 inf
    python -m pagedserve.benchmarks.serving --model llama3 --num-requests 512 --rates 4 16 inf \\
        --serve-args engine.load_format=dummy kernel=triton

Requests come from the standard workload (:mod:`pagedserve.benchmarks.workload`) and arrive as a
Poisson process (exponential gaps from ``random.Random(seed)``, rescaled so the last one leaves at
``N / rate`` s); ``inf`` sends them all at once (saturation). Each request is its own
``ModelStreamInfer`` call (``tritonclient.grpc.aio``, one shared channel), with
``stream=true``, ``ignore_eos`` and ``max_tokens`` = the drawn output length, and
``return_num_output_tokens`` so every streamed response says how many tokens it carries.

Metrics are client-side and follow vLLM's ``bench serve``: TTFT = send → first response carrying a
token; TPOT = (E2E − TTFT) / (output tokens − 1) per request; ITL = every gap between consecutive
token-carrying responses, pooled over requests; E2E = send → final response; throughputs divide by
the run's duration (first send → last final response).

Prompts are text, since the LLM model takes ``text_input``: each drawn prompt (token ids clamped
into the tokenizer's vocabulary) is decoded and trimmed until the server's tokenizer turns it back
into exactly the drawn number of tokens (BOS included); the server's ``num_input_tokens`` is
checked against it. A model with no ``tokenizer.json`` (``llama3`` with ``engine.load_format=dummy``)
is served from a temporary directory holding its ``config.json`` and tiny-llama's byte-level
tokenizer and chat template (``engine.weights=<dir>``, same architecture, random weights): prompts
are token ids < 512, valid in any larger vocabulary, and generated ids the borrowed tokenizer does
not know detokenize to nothing (token counts, not text, are what is measured).

Sweep syntax in ``--serve-args`` (``cache.block_size=8,16``, ``range(...)``, ``choice(...)``) runs the
benchmark once per combination, as ``serve -m`` would (Hydra's basic sweeper), each with its own
server, and gathers them under ``--sweep-dir``: results.csv, results.json and a PNG per swept key
(pagedserve.benchmarks.sweep).

In the same run the offline engine (``pagedserve.engine.llm.LLM``, the engine config the server
builds from the same overrides) generates the same prompt ids and output lengths; the report ends
with serving output tok/s at saturation ÷ offline output tok/s (issue 4's goal: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# ---------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ServingBenchConfig:
    model: str = "tiny-llama"
    serve_args: list[str] = field(default_factory=list)
    """Hydra overrides for ``serve`` (and for the offline engine's config)."""
    url: str | None = None
    """An already running server (host:port); default: start ``serve`` on a free port."""
    num_requests: int = 64
    prompt_len: tuple[int, int] = (64, 1024)
    output_len: tuple[int, int] = (16, 512)
    seed: int = 0
    rates: list[float] = field(default_factory=lambda: [2.0, 8.0, math.inf])
    stream_mode: str = "per-request"
    """``per-request``: one ModelStreamInfer call per request; ``shared``: one call for all."""
    warmup: bool = True
    offline: bool = True
    request_text: bool = True
    """Ask for ``text_output`` too (a real client wants the text; off sends counts only)."""
    timeout_s: float = 1800.0
    json_path: str | None = None
    markdown: bool = False
    sweep_dir: str | None = None
    """Where a sweep (sweep syntax in ``serve_args``) writes its jobs and results."""


# ---------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    text: str
    token_ids: list[int]  # what the tokenizer makes of ``text`` (BOS included): the offline prompt
    output_len: int


def build_prompts(
    tokenizer: Any,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    variant: int = 0,
    overhead: int = 0,
) -> list[Prompt]:
    """Texts that tokenize to the standard workload's prompt lengths (exactly, or within a token or two
    where a byte-level merge at the cut refuses to settle). ``variant`` shifts each prompt's first
    token id, so runs at different rates share no prefix (the server's prefix cache would otherwise
    serve later runs' prompts from earlier ones) while keeping every length. ``overhead``: tokens the
    front-end adds around each text (a chat template); the texts are that much shorter, so that the
    model still reads the drawn lengths."""
    from pagedserve.benchmarks.workload import standard_workload

    specials = len(tokenizer.encode(""))  # BOS
    filler = next(
        (
            w
            for w in (" the", " a", " and", " 1")
            if len(tokenizer.encode(w * 3, add_special_tokens=False)) == 3
        ),
        "",
    )
    vocab = tokenizer.vocab_size
    requests = standard_workload(num_requests, vocab, prompt_len, output_len, seed)
    high = min(100000, vocab - 1)  # the workload's id range
    low = min(1000, high // 2)
    prompts = []
    for request in requests:
        target = max(len(request.prompt_token_ids) - overhead, specials + 1)
        drawn = list(request.prompt_token_ids)
        drawn[0] = low + (drawn[0] - low + variant) % (high - low + 1)
        canonical = tokenizer.encode(tokenizer.decode(drawn), add_special_tokens=False)
        while len(canonical) < target:  # decoding can merge tokens; repeat to have enough
            canonical = canonical + canonical
        ids = canonical[: target - specials]
        for _ in range(32):
            text = tokenizer.decode(ids)
            encoded = tokenizer.encode(text)
            diff = len(encoded) - target
            if diff > 0:
                ids = ids[: len(ids) - diff]
            elif diff < 0 and filler:
                # a merge at the cut ate tokens: top up with a word that is one token on its own
                padded = text + filler * -diff
                again = tokenizer.encode(padded)
                if len(again) == target:
                    text, encoded = padded, again
                    break
                ids = ids[:-1]
            else:
                break
        prompts.append(Prompt(text, encoded, request.output_len))
    return prompts


# ---------------------------------------------------------------------------------------------------
# the model: config, tokenizer, offline engine


@dataclass
class Target:
    overrides: list[str]  # for serve and the offline engine
    engine_config: Any
    engine_registries: Any
    tokenizer: Any
    borrowed_dir: Path | None = None


def _compose(model: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from pagedserve import cli

    cli._prepare()  # plugins' config schemas, as `serve` registers them
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="pagedserve.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}", *overrides])
    return OmegaConf.to_object(cfg), cli._host


def resolve_target(model: str, overrides: list[str]) -> Target:
    """The engine config ``serve`` would build for ``model`` under ``overrides``, and its tokenizer;
    a model without one gets tiny-llama's (see the module docstring)."""
    from pagedserve.benchmarks.throughput import backend_module_registries
    from pagedserve.config import BackendSettings
    from pagedserve.models.presets import resolve_model_source
    from pagedserve.models.tiny import ensure_tiny_llama
    from pagedserve.models.tokenizer import Tokenizer
    from pagedserve.repository import ModelRepository

    borrowed = None
    for _ in range(2):
        config, host = _compose(model, overrides)
        registries = host.registries()
        spec = ModelRepository(config.repository_path()).read(model)
        backend = registries.model_backends.get(spec.config.backend)
        if not hasattr(backend, "engine_config"):
            raise SystemExit(f"model '{model}' (backend '{spec.config.backend}') is not an LLM model")
        settings = BackendSettings.from_config(config, registries)
        engine_config = backend.engine_config(spec, settings)
        source = resolve_model_source(engine_config.model, engine_config.load_format)
        tokenizer = Tokenizer.from_dir(source.directory) if source.directory else None
        if tokenizer is not None:
            return Target(
                overrides, engine_config, backend_module_registries(backend, settings), tokenizer, borrowed
            )
        if borrowed is not None or engine_config.load_format != "dummy":
            raise SystemExit(f"model '{model}' has no tokenizer.json; the server cannot take text prompts")
        borrowed = Path(tempfile.mkdtemp(prefix="pagedserve-serving-"))
        (borrowed / "config.json").write_text(json.dumps(source.hf_config))
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the config holds the chat template
            shutil.copy(ensure_tiny_llama() / name, borrowed / name)
        overrides = [*overrides, f"engine.weights={borrowed}"]
    raise AssertionError("unreachable")


def run_offline(target: Target, prompts: list[Prompt], warm: list[Prompt]) -> dict[str, Any]:
    """The same prompt ids and output lengths through ``LLM.generate`` (timed as ``bench`` times)."""
    import gc

    import torch
    from pagedserve.benchmarks.hf_peers import _sync
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.process_setup import use_cpu_threads
    from pagedserve.engine.sampling_params import SamplingParams

    def params(ps: list[Prompt]) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.0, max_tokens=p.output_len, ignore_eos=True) for p in ps]

    use_cpu_threads(target.engine_config.cpu_threads)  # as the server's engine process had them
    llm = LLM(target.engine_config, target.engine_registries)
    device = str(llm.engine.device)
    if warm:
        llm.generate([p.token_ids for p in warm], params(warm))
    _sync(device)
    cpu0, start = time.process_time(), time.perf_counter()
    outputs = llm.generate([p.token_ids for p in prompts], params(prompts))
    _sync(device)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    del llm, outputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "requests": len(prompts),
        "duration_s": seconds,
        "output_tokens": produced,
        "input_tokens": prompt_tokens,
        "output_throughput": produced / seconds,
        "total_token_throughput": (produced + prompt_tokens) / seconds,
        "cpu_s": cpu,
    }


# ---------------------------------------------------------------------------------------------------
# load generator


@dataclass
class Record:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""

    output_len: int
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each token-carrying response
    tokens: int = 0
    input_tokens: int = -1
    done: float = 0.0
    error: str | None = None


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request leaves: Poisson (exponential gaps), rescaled so
    the last leaves at ``n / rate``; all zero for ``rate = inf``."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    scale = (n / rate) / times[-1]
    return [x * scale for x in times]


def _inputs(prompt: Prompt) -> list[Any]:
    import tritonclient.grpc.aio as aioclient

    def tensor(name: str, value: object, datatype: str) -> Any:
        t = aioclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        return t

    sampling = {"max_tokens": prompt.output_len, "ignore_eos": True, "temperature": 0}
    return [
        tensor("text_input", prompt.text.encode(), "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
        tensor("exclude_input_in_output", True, "BOOL"),
        tensor("return_num_input_tokens", True, "BOOL"),
        tensor("return_num_output_tokens", True, "BOOL"),
    ]


def _on_response(record: Record, response: Any, now: float) -> bool:
    """Book one streamed response (kept minimal: the client must not be the bottleneck); True when
    it is the request's last."""
    outputs = response.outputs
    raw = response.raw_output_contents
    for i in range(len(outputs)):
        name = outputs[i].name
        if name == "num_output_tokens":
            n = int.from_bytes(raw[i][:4], "little") if raw[i] else 0
            if n:
                record.tokens += n
                record.chunks.append(now)
        elif name == "num_input_tokens" and record.input_tokens < 0:
            record.input_tokens = int.from_bytes(raw[i][:4], "little")
    return response.parameters["triton_final_response"].bool_param


@dataclass
class _Load:
    """One rate's requests: what each one sends, when (offset from ``start``), and its record."""

    model: str
    payloads: list
    requested: list
    records: list[Record]
    offsets: list[float]
    start: float
    timeout: float

    def request(self, i: int) -> dict[str, Any]:
        return {
            "model_name": self.model,
            "inputs": self.payloads[i],
            "outputs": self.requested,
            "request_id": str(i),
        }

    async def wait_for_arrival(self, i: int) -> None:
        delay = self.start + self.offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_load(
    url: str,
    model: str,
    prompts: list[Prompt],
    rate: float,
    seed: int,
    mode: str,
    request_text: bool,
    timeout: float,
) -> tuple[list[Record], float, float]:
    """Send ``prompts`` at ``rate``; returns the records, the duration and the client's CPU seconds."""
    import tritonclient.grpc.aio as aioclient

    outputs = ["num_input_tokens", "num_output_tokens"] + (["text_output"] if request_text else [])
    requested = [aioclient.InferRequestedOutput(name) for name in outputs]
    payloads = [_inputs(p) for p in prompts]  # built before the clock starts
    records = [Record(p.output_len) for p in prompts]
    offsets = arrival_offsets(len(prompts), rate, seed)
    async with aioclient.InferenceServerClient(url) as client:
        cpu0 = time.process_time()
        start = time.perf_counter()
        load = _Load(model, payloads, requested, records, offsets, start, timeout)
        if mode == "per-request":
            await _per_request_streams(client, load)
        elif mode == "shared":
            await _shared_stream(client, load)
        else:
            raise ValueError(f"stream mode {mode!r}: per-request or shared")
        end = max((r.done for r in records), default=start)
        cpu = time.process_time() - cpu0
    first = min((r.sent for r in records), default=start)
    return records, end - first, cpu


async def _per_request_streams(client: Any, load: _Load) -> None:
    async def one(i: int) -> None:
        record = load.records[i]

        async def request() -> Any:
            yield load.request(i)

        record.sent = time.perf_counter()
        try:
            async for result, error in client.stream_infer(request(), stream_timeout=load.timeout):
                now = time.perf_counter()
                if error is not None:
                    record.error = str(error)
                    break
                if _on_response(record, result._result, now):
                    break
        except Exception as error:  # noqa: BLE001 - a failed request is reported, not fatal
            record.error = str(error)
        record.done = time.perf_counter()

    tasks = []
    for i in range(len(load.records)):
        await load.wait_for_arrival(i)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def _shared_stream(client: Any, load: _Load) -> None:
    records = load.records
    finished = asyncio.Event()
    pending = len(records)

    async def requests() -> Any:
        for i in range(len(records)):
            await load.wait_for_arrival(i)
            records[i].sent = time.perf_counter()
            yield load.request(i)
        await finished.wait()  # closing our side early is fine, but keep the call open until done

    stream = client.stream_infer(requests(), stream_timeout=load.timeout)
    async for result, error in stream:
        now = time.perf_counter()
        if error is not None:  # in-band errors carry no id we can trust; count it on the first open
            for record in records:
                if record.sent and not record.done:
                    record.error, record.done = str(error), now
                    pending -= 1
                    break
        else:
            response = result._result
            record = records[int(response.id)]
            if _on_response(record, response, now):
                record.done = now
                pending -= 1
        if pending == 0:
            finished.set()
            break
    stream.cancel()


# ---------------------------------------------------------------------------------------------------
# metrics


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: list[Record], duration: float, rate: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.chunks]
    ttft = [r.chunks[0] - r.sent for r in ok]
    e2e = [r.done - r.sent for r in ok]
    tpot = [(r.done - r.chunks[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    output_tokens = sum(r.tokens for r in ok)
    input_tokens = sum(max(r.input_tokens, 0) for r in ok)
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.output_len for r in records),
        # Below output_tokens when the server folded a lagging stream's pieces together.
        "token_responses": sum(len(r.chunks) for r in ok),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats(ttft),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats(itl),
        "e2el_ms": _stats(e2e),
    }


# ---------------------------------------------------------------------------------------------------
# server process


class Server:
    """``serve`` as a subprocess on a free port (or nothing, for ``--url``)."""

    def __init__(self, model: str, overrides: list[str], url: str | None) -> None:
        self.process = None
        self.url = url
        self.model = model
        self.overrides = overrides

    def __enter__(self) -> Server:
        if self.url is None:
            from pagedserve.benchmarks.grpc_overhead import start

            command = [
                sys.executable,
                "-m",
                "pagedserve",
                f"model={self.model}",
                "server.grpc_port=0",
                "frontends=[grpc]",
                "server.host=127.0.0.1",
                "server.metrics_port=-1",
                *self.overrides,
            ]
            self.process, self.url = start(command)
        asyncio.run(self._wait_model_ready())
        return self

    async def _wait_model_ready(self) -> None:
        import tritonclient.grpc.aio as aioclient

        async with aioclient.InferenceServerClient(self.url) as client:
            for _ in range(1200):
                try:
                    if await client.is_model_ready(self.model):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if self.process is not None and self.process.poll() is not None:
                    break
                await asyncio.sleep(0.25)
        raise RuntimeError(f"model '{self.model}' never became ready at {self.url}")

    def cpu_seconds(self) -> float | None:
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except Exception:  # noqa: BLE001
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------------------------------------------
# the run


def run(cfg: ServingBenchConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(width=200)
    target = resolve_target(cfg.model, list(cfg.serve_args))
    try:
        # One prompt set per rate (same lengths, no shared prefixes); the offline engine gets the
        # saturation run's. Warm-up as `bench` does: the workload's size and prompt lengths, short outputs.
        per_rate = [
            build_prompts(target.tokenizer, cfg.num_requests, cfg.prompt_len, cfg.output_len, cfg.seed, k + 1)
            for k in range(len(cfg.rates))
        ]
        warm = (
            build_prompts(target.tokenizer, cfg.num_requests, cfg.prompt_len, (2, 6), cfg.seed + 1)
            if cfg.warmup
            else []
        )
        prompts = per_rate[-1]
        for k, rate in enumerate(cfg.rates):
            if math.isinf(rate):
                prompts = per_rate[k]
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": cfg.model,
            "serve_args": cfg.serve_args,
            "overrides": target.overrides,
            "borrowed_tokenizer": target.borrowed_dir is not None,
            "num_requests": cfg.num_requests,
            "prompt_tokens": sum(len(p.token_ids) for p in prompts),
            "prompt_len_mismatches": 0,
            "stream_mode": cfg.stream_mode,
            "cpu_count": os.cpu_count(),
            "runs": [],
        }
        with Server(cfg.model, target.overrides, cfg.url) as server:
            assert server.url is not None
            if warm:
                asyncio.run(
                    run_load(
                        server.url,
                        cfg.model,
                        warm,
                        math.inf,
                        cfg.seed,
                        cfg.stream_mode,
                        cfg.request_text,
                        cfg.timeout_s,
                    )
                )
            for rate, prompts_k in zip(cfg.rates, per_rate, strict=True):
                server_cpu0 = server.cpu_seconds()
                records, duration, client_cpu = asyncio.run(
                    run_load(
                        server.url,
                        cfg.model,
                        prompts_k,
                        rate,
                        cfg.seed,
                        cfg.stream_mode,
                        cfg.request_text,
                        cfg.timeout_s,
                    )
                )
                summary = summarize(records, duration, rate)
                server_cpu1 = server.cpu_seconds()
                summary["client_cpu_s"] = client_cpu
                summary["server_cpu_s"] = (
                    None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
                )
                mismatches = sum(
                    1
                    for r, p in zip(records, prompts_k, strict=True)
                    if r.error is None and r.input_tokens != len(p.token_ids)
                )
                summary["prompt_len_mismatches"] = mismatches
                results["prompt_len_mismatches"] = max(results["prompt_len_mismatches"], mismatches)
                results["runs"].append(summary)
                console.print(
                    f"rate {summary['request_rate']}: {summary['completed']}/{len(records)} done in "
                    f"{duration:.1f} s, {summary['output_throughput']:,.0f} output tok/s"
                )
        if cfg.offline:
            results["offline"] = run_offline(target, prompts, warm)
            saturated = [r for r in results["runs"] if r["request_rate"] == "inf"]
            if saturated:
                results["saturation_ratio"] = (
                    saturated[-1]["output_throughput"] / results["offline"]["output_throughput"]
                )
    finally:
        if target.borrowed_dir is not None:
            shutil.rmtree(target.borrowed_dir, ignore_errors=True)
    print_report(results, console, cfg.markdown)
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(results, indent=2))
    return results


def _fmt(x: float) -> str:
    return "nan" if x != x else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def report_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each table of the report."""
    runs = results["runs"]
    head1 = ["rate (req/s)", "duration s", "completed", "req/s", "output tok/s", "total tok/s",
             "E2E p50 ms", "E2E p99 ms", "tok/resp", "client cores", "server cores"]  # fmt: skip
    rows1 = []
    for r in runs:
        d = r["duration_s"]
        server_cpu = f"{r['server_cpu_s'] / d:.2f}" if r.get("server_cpu_s") is not None and d else "-"
        rows1.append([
            str(r["request_rate"]), f"{d:.1f}", f"{r['completed']}/{r['completed'] + r['failed']}",
            f"{r['request_throughput']:.2f}", f"{r['output_throughput']:,.0f}",
            f"{r['total_token_throughput']:,.0f}", _fmt(r["e2el_ms"]["p50"]), _fmt(r["e2el_ms"]["p99"]),
            f"{r['output_tokens'] / max(r['token_responses'], 1):.2f}",
            f"{r['client_cpu_s'] / d:.2f}" if d else "-", server_cpu,
        ])  # fmt: skip
    offline = results.get("offline")
    if offline:
        rows1.append([
            "offline LLM", f"{offline['duration_s']:.1f}", f"{offline['requests']}/{offline['requests']}",
            f"{offline['requests'] / offline['duration_s']:.2f}", f"{offline['output_throughput']:,.0f}",
            f"{offline['total_token_throughput']:,.0f}", "-", "-", "-", "-",
            f"{offline['cpu_s'] / offline['duration_s']:.2f}",
        ])  # fmt: skip
    head2 = ["rate (req/s)"] + [
        f"{m} {s}" for m in ("TTFT", "TPOT", "ITL") for s in ("mean", "p50", "p90", "p99")
    ]
    rows2 = [
        [str(r["request_rate"])]
        + [_fmt(r[f"{m}_ms"][s]) for m in ("ttft", "tpot", "itl") for s in ("mean", "p50", "p90", "p99")]
        for r in runs
    ]
    title = (
        f"Serving: {results['model']}, {results['num_requests']} requests ({results['stream_mode']} streams)"
    )
    return [(title + " — throughput", head1, rows1), (title + " — latency (ms)", head2, rows2)]


def print_report(results: dict[str, Any], console: Console, markdown: bool = False) -> None:
    for title, header, rows in report_tables(results):
        table = Table(title=title)
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if markdown:
            print("| " + " | ".join(header) + " |")
            print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
            print()
    for r in results["runs"]:
        if r["failed"] or r["output_tokens"] != r["expected_output_tokens"]:
            console.print(
                f"[red]rate {r['request_rate']}: {r['failed']} failed, {r['output_tokens']} of "
                f"{r['expected_output_tokens']} output tokens; errors: {r['errors']}[/]"
            )
    if results.get("prompt_len_mismatches"):
        console.print(
            f"[yellow]{results['prompt_len_mismatches']} prompts' server token counts differ from ours[/]"
        )
    if "saturation_ratio" in results:
        ratio = results["saturation_ratio"]
        console.print(
            f"serving at saturation / offline engine, output tok/s: [bold]{ratio:.2f}[/] "
            f"(goal ≥ 0.90: {'met' if ratio >= 0.9 else 'not met'})"
        )


# ---------------------------------------------------------------------------------------------------
# sweeps


def sweep_settings(serve_args: list[str]) -> list[list[str]]:
    """Each combination of ``serve_args``' sweeps, expanded as Hydra's basic sweeper does; the
    arguments themselves when they hold no sweep. Raises ValueError for a malformed override."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(serve_args))
    except HydraException as error:
        raise ValueError(str(error).strip().splitlines()[0]) from None
    if not is_sweep(serve_args):
        return [list(serve_args)]
    return BasicSweeper.split_arguments(parsed, None)[0]


def is_sweep(serve_args: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(list(serve_args)))


def check_combinations(model: str, combinations: list[list[str]]) -> None:
    """Compose every combination's config before any server starts, so a bad key or value in the
    last one does not cost the runs before it. Raises ValueError naming the combination."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not combinations:
        raise ValueError("the sweep has no combination to run")
    for job, args in enumerate(combinations):
        try:
            _compose(model, args)
        except (HydraException, OmegaConfBaseException, ValueError) as error:
            raise ValueError(f"sweep job {job} ({' '.join(args)}): {str(error).strip()}") from None


def sweep_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per request rate (and one for the offline engine), flat for a CSV."""
    rows = []
    for r in results["runs"]:
        latency = {
            f"{m}_{s}_ms": r[f"{m}_ms"][s] for m in ("ttft", "tpot", "itl", "e2el") for s in ("p50", "p99")
        }
        rows.append({
            "rate": r["request_rate"], "completed": r["completed"], "failed": r["failed"],
            "output_throughput": r["output_throughput"],
            "total_token_throughput": r["total_token_throughput"], **latency,
        })  # fmt: skip
    offline = results.get("offline")
    if offline:
        rows.append({
            "rate": "offline", "completed": offline["requests"], "failed": 0,
            "output_throughput": offline["output_throughput"],
            "total_token_throughput": offline["total_token_throughput"],
        })  # fmt: skip
    return rows


def run_sweep(cfg: ServingBenchConfig, console: Console | None = None) -> Path:
    """The benchmark once per combination of ``cfg.serve_args``' sweeps; returns the sweep directory."""
    from pagedserve.benchmarks import sweep

    console = console or Console(width=200)
    combinations = sweep_settings(cfg.serve_args)
    check_combinations(cfg.model, combinations)
    sweep_dir = Path(cfg.sweep_dir or time.strftime("multirun/serving_%Y-%m-%d_%H-%M-%S"))
    for job, args in enumerate(combinations):
        job_dir = sweep_dir / str(job)
        job_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]sweep job {job}[/]: {' '.join(args)}")
        results = run(replace(cfg, serve_args=args, json_path=str(job_dir / "serving.json")), console)
        sweep.save_job(job_dir, job, sweep.job_settings(args), sweep_rows(results))
    records = sweep.load_jobs(sweep_dir)
    swept = sweep.swept_keys(cfg.serve_args)
    sweep.print_sweep(sweep.flatten(records, swept), swept, sweep.SERVING, console)
    for path in sweep.write_sweep(sweep_dir, records, swept, sweep.SERVING):
        console.print(f"sweep: wrote {path}")
    return sweep_dir


def parse_args(argv: list[str] | None = None) -> ServingBenchConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument(
        "--serve-args", nargs="*", default=[], help="Hydra overrides for serve and the offline engine"
    )
    parser.add_argument("--url", help="target a running server (host:port) instead of starting one")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[64, 1024])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[2.0, 8.0, math.inf], help="req/s; inf = all at once"
    )
    parser.add_argument("--stream-mode", choices=["per-request", "shared"], default="per-request")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline engine comparison")
    parser.add_argument("--no-text", action="store_true", help="do not request text_output (counts only)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-stream timeout, seconds")
    parser.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--sweep-dir", help="a sweep's directory (default: multirun/serving_<date>_<time>)")
    a = parser.parse_args(argv)
    try:
        sweep_settings(a.serve_args)
    except ValueError as error:
        parser.error(f"--serve-args: {error}")
    return ServingBenchConfig(
        model=a.model,
        serve_args=a.serve_args,
        url=a.url,
        num_requests=a.num_requests,
        prompt_len=tuple(a.prompt_len),  # type: ignore[arg-type]
        output_len=tuple(a.output_len),  # type: ignore[arg-type]
        seed=a.seed,
        rates=a.rates,
        stream_mode=a.stream_mode,
        warmup=not a.no_warmup,
        offline=not a.no_offline,
        request_text=not a.no_text,
        timeout_s=a.timeout,
        json_path=a.json_path,
        markdown=a.markdown,
        sweep_dir=a.sweep_dir,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if not is_sweep(cfg.serve_args):
        run(cfg)
        return
    try:
        run_sweep(cfg)
    except ValueError as error:  # a bad combination, found before any server started
        print(f"serving sweep: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
