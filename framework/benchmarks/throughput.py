"""Offline throughput: our engine on the standard workload, beside the HF transformers peers.

Run through the ``bench`` console script (a Hydra app sharing ``serve``'s config), e.g.
``bench model=tiny-llama bench.num_requests=64`` on CPU or
``bench model=llama3 engine.load_format=dummy bench.num_requests=512`` on a GPU.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pagedserve.benchmarks import hf_peers
from pagedserve.benchmarks.workload import BenchRequest, standard_workload
from pagedserve.config import BackendSettings, BenchConfig, ServeConfig
from pagedserve.engine.process_setup import use_compile_cache, use_cpu_threads, wait_policy
from pagedserve.models.presets import resolve_model_source
from pagedserve.plugin_manager import Registries
from pagedserve.repository import ModelRepository
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)
RESULTS_FILE = "bench_results.jsonl"


@dataclass
class Row:
    system: str
    requests: int
    output_tokens: int
    seconds: float
    total_tokens: int
    settings: str
    # Per request, from the start of the timed run (every request arrives then): time to its first
    # token and mean time per later token. Only our engine's row has them.
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return self.total_tokens / self.seconds


def settings_label(config: ServeConfig) -> str:
    """The table's settings column; weight and KV cache dtypes only when they are not the model's own,
    CPU threads only when set."""
    label = f"block={config.cache.block_size} sched={config.scheduler.policy} kernel={config.kernel}"
    if config.engine.quantization:
        label += f" w={config.engine.quantization}"
    if config.cache.dtype != "auto":
        label += f" kv={config.cache.dtype}"
    if config.engine.cpu_threads is not None:
        label += f" threads={config.engine.cpu_threads}"
    return label


def run_bench(config: BenchConfig, registries: Registries) -> list[Row]:
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    spec = ModelRepository(config.repository_path()).read(config.startup_models()[0])  # type: ignore[index]
    backend = registries.model_backends.get(spec.config.backend)
    if not hasattr(backend, "engine_config"):
        raise ValueError(f"model '{spec.name}' (backend '{spec.config.backend}') is not an LLM model")
    settings = BackendSettings.from_config(config, registries)
    engine_config = backend.engine_config(spec, settings)  # type: ignore[attr-defined]
    source = resolve_model_source(engine_config.model, engine_config.load_format)
    # The server's engine process runs with these threads; the peers below run with them too.
    threads = use_cpu_threads(engine_config.cpu_threads)
    use_compile_cache(engine_config.compile_cache_dir)
    log.info("CPU threads: %d intra-op, 1 inter-op; OpenMP wait: %s", threads, wait_policy())
    llm = LLM(engine_config, backend_module_registries(backend, settings))
    engine = llm.engine
    vocab = int(source.hf_config["vocab_size"])
    b = config.bench
    requests = standard_workload(b.num_requests, vocab, tuple(b.prompt_len), tuple(b.output_len), b.seed)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    label = settings_label(config)

    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    # Warm-up with the workload's own size and prompt lengths (short outputs), so the batch shapes of
    # the timed run occur once before it and their kernels compile outside it (Triton specialises on
    # sizes, e.g. the number of sequences in a prefill or the split count of a large eager decode).
    warm = standard_workload(b.num_requests, vocab, tuple(b.prompt_len), (2, 6), seed=1)
    llm.generate(
        [r.prompt_token_ids for r in warm],
        [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in warm],
    )
    device = str(next(engine.runner.model.parameters()).device)
    runner = engine.runner
    graph_steps, eager_steps = runner.num_graph_steps, runner.num_eager_steps
    hf_peers._sync(device)
    start = time.perf_counter()
    timings = timed_generate(engine, [r.prompt_token_ids for r in requests], params)
    hf_peers._sync(device)
    seconds = time.perf_counter() - start
    produced = sum(t.tokens for t in timings)
    row = Row("pagedserve", len(requests), produced, seconds, produced + prompt_tokens, label)
    rows = [latencies(row, timings, start)]
    log.info(
        "pagedserve: %d steps (%d decode steps as CUDA graphs, %d eager), %d preemptions, attention=%s",
        runner.num_graph_steps - graph_steps + runner.num_eager_steps - eager_steps,
        runner.num_graph_steps - graph_steps,
        runner.num_eager_steps - eager_steps,
        engine.scheduler.num_preemptions,
        engine.attention_backend,
    )
    dtype = next(engine.runner.model.parameters()).dtype
    del llm, engine, runner, timings  # free the KV cache and weights before the peers load theirs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        still = torch.cuda.memory_allocated() / 2**30
        log.info("engine freed: %.1f GiB of GPU memory still allocated", still)
    rows += _run_peers(config, requests, source, device, dtype, prompt_tokens)
    return rows


@dataclass
class Timing:
    """One request of the timed run: when its first token and its end reached the host."""

    first_token: float = 0.0
    finished: float = 0.0
    tokens: int = 0


def timed_generate(engine: Any, prompts: list[list[int]], params: list[Any]) -> list[Timing]:
    """``LLM.generate``'s loop, noting when each request's first token and end come out of a step."""
    ids = [f"bench-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(request_id, prompt, p)
    timings = {request_id: Timing() for request_id in ids}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            timing = timings[output.request_id]
            if not timing.first_token and output.outputs[0].num_new_tokens:
                timing.first_token = now
            if output.finished:
                timing.finished, timing.tokens = now, len(output.outputs[0].token_ids)
    return [timings[request_id] for request_id in ids]


def latencies(row: Row, timings: list[Timing], start: float) -> Row:
    """``row`` with TTFT and TPOT percentiles (ms); TPOT as vLLM's bench defines it."""
    ttft = [t.first_token - start for t in timings if t.first_token]
    tpot = [(t.finished - t.first_token) / (t.tokens - 1) for t in timings if t.first_token and t.tokens > 1]
    if ttft:
        row.ttft_p50_ms, row.ttft_p99_ms = (float(x) for x in np.percentile(ttft, [50, 99]) * 1000)
    if tpot:
        row.tpot_p50_ms, row.tpot_p99_ms = (float(x) for x in np.percentile(tpot, [50, 99]) * 1000)
    return row


def backend_module_registries(backend: Any, settings: BackendSettings) -> Any:
    import sys

    return sys.modules[backend.__module__].engine_registries(settings)


def _run_peers(
    config: BenchConfig,
    requests: list[BenchRequest],
    source: Any,
    device: str,
    dtype: torch.dtype,
    prompt_tokens: int,
) -> list[Row]:
    if not config.bench.peers:
        return []
    model = hf_peers.load_hf_model(source.directory, source.hf_config, device, dtype)
    rows = []
    for peer in config.bench.peers:
        if peer not in ("hf_generate", "hf_continuous"):
            raise ValueError(f"bench.peers: unknown peer '{peer}'; available: hf_generate, hf_continuous")
        try:
            row = _run_peer(peer, config, model, requests, device, prompt_tokens)
        except Exception:  # a peer that breaks (e.g. another transformers API) must not hide our row
            log.exception("peer %s failed; its row is left out", peer)
            continue
        if row.output_tokens == 0:
            log.error("peer %s produced no tokens; its row is left out", peer)
            continue
        rows.append(row)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _run_peer(
    peer: str, config: BenchConfig, model: Any, requests: list[BenchRequest], device: str, prompt_tokens: int
) -> Row:
    b = config.bench
    if peer == "hf_generate":
        useful, seconds = hf_peers.run_hf_generate(model, requests, b.hf_batch_size, device)
        settings = f"static batch {b.hf_batch_size}, sdpa"
    else:
        useful, seconds = hf_peers.run_hf_continuous(
            model, requests, device, b.hf_block_size, b.hf_max_batch_tokens, b.hf_num_blocks
        )
        settings = f"continuous batching, paged, block {b.hf_block_size}"
    return Row(peer, len(requests), useful, seconds, useful + prompt_tokens, settings)


def print_rows(rows: list[Row], limit_tps: float | None, console: Console | None = None) -> None:
    console = console or Console(width=200)
    table = Table(title="Offline throughput, standard workload (greedy, ignore_eos)")
    for column in (
        "system",
        "settings",
        "requests",
        "output tok",
        "seconds",
        "output tok/s",
        "total tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "vs",
    ):
        table.add_column(column, justify="right" if column not in ("system", "settings") else "left")
    peers = {r.system: r.output_tps for r in rows if r.system != "pagedserve" and r.output_tokens}
    for row in rows:
        ratios = []
        if row.system == "pagedserve":
            ratios = [f"{row.output_tps / tps:.1f}x {name}" for name, tps in peers.items()]
            if limit_tps:
                ratios.append(f"{row.output_tps / limit_tps:.0%} of limit")
        table.add_row(
            row.system,
            row.settings,
            str(row.requests),
            f"{row.output_tokens:,}",
            f"{row.seconds:.1f}",
            f"{row.output_tps:,.0f}",
            f"{row.total_tps:,.0f}",
            _pair(row.ttft_p50_ms, row.ttft_p99_ms),
            _pair(row.tpot_p50_ms, row.tpot_p99_ms),
            ", ".join(ratios),
        )
    console.print(table)


def _pair(p50: float | None, p99: float | None) -> str:
    return "-" if p50 is None or p99 is None else f"{p50:,.1f} / {p99:,.1f}"


def save_rows(rows: list[Row], directory: Path) -> None:
    with (directory / RESULTS_FILE).open("a") as handle:
        for row in rows:
            handle.write(json.dumps(asdict(row)) + "\n")


def sweep_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as a sweep gathers them (pagedserve.benchmarks.sweep): the throughputs included."""
    return [asdict(row) | {"output_tps": row.output_tps, "total_tps": row.total_tps} for row in rows]
