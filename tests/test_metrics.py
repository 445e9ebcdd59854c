"""The Prometheus endpoint: Triton's metric names and labels, values that move as requests are served
(tensor models and the LLM engine), and the port options."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pagedserve.metrics import EngineState, LLMMetrics
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .test_llm_api import llm_inputs
from .test_server_api import simple_inputs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SIMPLE = {"model": "simple", "version": "1"}
LLM = {"model": "tiny-llama", "version": "1"}


def metrics_port(server: ServerProcess) -> int:
    match = re.search(r"pagedserve: metrics listening on [^:]+:(\d+)", server.output)
    assert match, server.output
    return int(match.group(1))


def scrape(port: int) -> tuple[str, Samples]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def metered() -> Iterator[ServerProcess]:
    process = start_server("model=[simple]", "server.metrics_port=0")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def llm_metered() -> Iterator[ServerProcess]:
    process = start_server(
        "model=[tiny-llama]", "server.metrics_port=0", "cache.num_blocks=256", "scheduler.max_num_seqs=8"
    )
    yield process
    process.stop()


def test_triton_counters_move(metered: ServerProcess) -> None:
    port = metrics_port(metered)
    _, before = scrape(port)
    with metered.client() as client:
        client.infer("simple", simple_inputs(batch=2))
        client.infer("simple", simple_inputs())
        bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("simple", [bad, simple_inputs()[1]])
    text, after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("nv_inference_request_success", **SIMPLE) == 2
    assert moved("nv_inference_count", **SIMPLE) == 3  # counts batch elements
    assert 1 <= moved("nv_inference_exec_count", **SIMPLE) <= 2
    assert moved("nv_inference_request_failure", **SIMPLE, reason="OTHER") == 1
    for reason in ("REJECTED", "CANCELED", "BACKEND"):
        assert moved("nv_inference_request_failure", **SIMPLE, reason=reason) == 0
    for name in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        assert moved(f"nv_inference_{name}_duration_us", **SIMPLE) >= 0
    assert moved("nv_inference_request_duration_us", **SIMPLE) > 0
    assert value(after, "nv_inference_pending_request_count", **SIMPLE) == 0
    assert "# TYPE nv_inference_request_success counter" in text
    assert "# TYPE nv_inference_pending_request_count gauge" in text
    assert value(after, "nv_cpu_memory_total_bytes") > 0
    if _has_gpu():
        assert value(after, "nv_gpu_memory_total_bytes", gpu_uuid=_first_gpu_uuid(text)) > 0
    else:
        assert "nv_gpu_" not in text


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _first_gpu_uuid(text: str) -> str:
    match = re.search(r'nv_gpu_memory_total_bytes\{gpu_uuid="([^"]+)"\}', text)
    assert match, "no GPU memory metric"
    return match.group(1)


def test_llm_engine_metrics_move(llm_metered: ServerProcess) -> None:
    port = metrics_port(llm_metered)
    _, before = scrape(port)
    with llm_metered.client() as client:
        for _ in range(2):
            client.infer("tiny-llama", llm_inputs(sampling={"max_tokens": 4, "ignore_eos": True}))
    text, after = scrape(port)

    def moved(name: str) -> float:
        return value(after, name, **LLM) - value(before, name, **LLM)

    assert moved("vllm:generation_tokens_total") == 8
    assert moved("vllm:prompt_tokens_total") > 0
    assert moved("vllm:time_to_first_token_seconds_count") == 2
    assert moved("vllm:e2e_request_latency_seconds_count") == 2
    assert moved("vllm:time_per_output_token_seconds_count") == 6  # one per token after the first
    assert moved("vllm:inter_token_latency_seconds_count") == 6
    assert value(after, "vllm:time_to_first_token_seconds_bucket", **LLM, le="+Inf") == value(
        after, "vllm:time_to_first_token_seconds_count", **LLM
    )
    assert value(after, "vllm:num_requests_running", **LLM) == 0
    assert value(after, "vllm:num_requests_waiting", **LLM) == 0
    assert 0 <= value(after, "vllm:kv_cache_usage_perc", **LLM) <= 1
    assert moved("vllm:prefix_cache_queries_total") > 0
    assert 0 <= value(after, "vllm:gpu_prefix_cache_hit_rate", **LLM) <= 1
    assert value(after, "vllm:num_preemptions_total", **LLM) == 0
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    assert moved("nv_inference_request_success") == 2


def test_only_metrics_path_is_served(metered: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(metered)}/other", timeout=10)
    assert info.value.code == 404


def test_metrics_off_and_port_taken(metered: ServerProcess) -> None:
    off = start_server("model=[simple]", "server.metrics_port=-1")
    try:
        assert "metrics listening" not in off.output
    finally:
        off.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = start_server("model=[simple]", f"server.metrics_port={port}")
        try:
            with busy.client() as client:
                assert client.is_server_ready()  # inference still serves
            assert "metrics listening" not in busy.output
            assert "serving without /metrics" in busy.output
        finally:
            busy.stop()


def test_failures_are_filed_by_reason() -> None:
    import grpc
    from pagedserve.errors import InferenceError
    from pagedserve.statistics import ModelStats

    stats = ModelStats()
    for error in (
        InferenceError.unavailable("Exceeds maximum queue size"),
        InferenceError.cancelled("Request was cancelled"),
        InferenceError.internal("model raised"),
        InferenceError("bad input"),
        InferenceError("odd", grpc.StatusCode.UNKNOWN),
    ):
        stats.record_failure(1_000, error.failure_reason)
    snapshot = stats.snapshot()
    assert snapshot.fail.count == 5
    assert snapshot.fail_reasons == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 2, "OTHER": 1}


@pytest.mark.parametrize("deltas", [[1, 1, 1, 1], [2, 2], [1, 3], [4], [3, 1]])
def test_llm_metrics_count_every_token_however_outputs_are_joined(deltas: list[int]) -> None:
    # A lagging stream gets several steps' tokens in one output; the histograms must not depend on it.
    metrics = LLMMetrics()
    timer = metrics.start()
    for i, num_new in enumerate(deltas):
        metrics.on_output(timer, num_new, num_prompt_tokens=5, finished=i == len(deltas) - 1)
    snapshot = metrics.snapshot(EngineState(0, 0, 0.0, 0, 0, 0))
    assert snapshot.generation_tokens == 4
    assert snapshot.inter_token_latency.count == 3
    assert (snapshot.time_to_first_token.count, snapshot.time_per_output_token.count) == (1, 3)
    assert (snapshot.request_generation_tokens.count, snapshot.request_generation_tokens.total) == (1, 4)
    assert snapshot.inter_token_latency.total >= 0
