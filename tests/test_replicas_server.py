"""Two data-parallel replicas of tiny-llama behind one model, through the stock tritonclient: requests
spread over both engines, and one engine process killed mid-generation fails only its own requests
while the other replica's finish and the model stays READY."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .test_metrics import metrics_port, scrape, value

MODEL = "tiny-dp"
CONFIG = """
backend: llm
max_batch_size: 0
instance_group: [{kind: KIND_CPU, count: 2}]
parameters:
  weights: tiny-llama
"""
WAIT = 120.0


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository: Path = tmp_path_factory.mktemp("models")
    (repository / f"{MODEL}.yaml").write_text(CONFIG)
    server = start_server(
        f"repository={repository}",
        f"model={MODEL}",
        "model_control_mode=explicit",
        "engine.cpu_threads=2",
        "cache.num_blocks=512",
        "scheduler.max_num_seqs=8",
    )
    yield server
    server.stop()


def inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    sampling = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    tensors = []
    for name, data, datatype in (
        ("text_input", prompt.encode(), "BYTES"),
        ("stream", True, "BOOL"),
        ("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_ if datatype == "BYTES" else bool))
        tensors.append(tensor)
    return tensors


class Streams:
    """One stream (and client) per request, so every error is its request's; per request id: its
    text so far, its error, whether it is done."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.clients: list[grpcclient.InferenceServerClient] = []
        self.results: queue.Queue = queue.Queue()
        self.text: dict[str, str] = {}
        self.errors: dict[str, object] = {}
        self.done: set[str] = set()

    def send(self, request_ids: list[str], max_tokens: int) -> None:
        for request_id in request_ids:
            client = self.server.client()
            self.clients.append(client)
            self.text[request_id] = ""
            client.start_stream(callback=functools.partial(self._put, request_id))
            prompt = f"request {request_id} asks the replicas"
            client.async_stream_infer(
                MODEL, inputs(prompt, max_tokens), request_id=request_id, enable_empty_final_response=True
            )

    def _put(self, request_id: str, result: object, error: object) -> None:
        self.results.put((request_id, result, error))

    def pump_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            request_id, result, error = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:
                self.errors[request_id] = error
                self.done.add(request_id)
                continue
            self.text[request_id] += b"".join(result.as_numpy("text_output") or []).decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                self.done.add(request_id)

    def started(self, request_ids: list[str]) -> bool:
        return all(self.text[r] or r in self.done for r in request_ids)

    def close(self, cancel: bool = False) -> None:
        for client in self.clients:
            client.stop_stream(cancel_requests=cancel)
            client.close()


def replica_samples(server: ServerProcess) -> dict[str, list[float]]:
    _, samples = scrape(metrics_port(server))
    names = ["routed", "outstanding", "up", "restarts"]
    metric = {
        "routed": "pagedserve:replica_requests_routed_total",
        "outstanding": "pagedserve:replica_outstanding_sequences",
        "up": "pagedserve:replica_up",
        "restarts": "pagedserve:replica_engine_restarts_total",
    }
    return {
        name: [value(samples, metric[name], model=MODEL, version="1", replica=str(i)) for i in range(2)]
        for name in names
    }


def engine_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's engine children (multiprocessing's spawn entry point, not its resource tracker)."""
    children = psutil.Process(server.process.pid).children()
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def test_concurrent_requests_spread_over_both_replicas(dp_server: ServerProcess) -> None:
    streams = Streams(dp_server)
    ids = [f"b{i}" for i in range(6)]
    try:
        streams.send(ids, max_tokens=1500)
        streams.pump_until(lambda: streams.started(ids))
        during = replica_samples(dp_server)
    finally:
        streams.close(cancel=True)
    assert during["routed"] == [3, 3]
    assert during["outstanding"] == [3, 3]
    assert during["up"] == [1, 1]
    _, samples = scrape(metrics_port(dp_server))
    # The model-level families stay one series per model: the sums over its replicas.
    assert value(samples, "pagedserve:engine_restarts_total", model=MODEL, version="1") == 0


BAD_CONFIGS = [
    ({"kind": "KIND_CPU", "count": 64}, {}, "instance_group: 64 CPU replicas, but engine.cpu_threads=2"),
    ({"kind": "KIND_GPU", "gpus": [99]}, {}, "instance_group[0].gpus: GPU 99 is not visible"),
    ({"kind": "KIND_CPU", "count": 2}, {"routing_policy": "nearest"}, "unknown routing policy 'nearest'"),
    (
        {"kind": "KIND_CPU", "count": 2},
        {"routing_policy": "prefix_affinity", "routing_prefix_blocks": "-3"},
        "parameters.routing_prefix_blocks must be in [1, 1024], got -3",
    ),
    (
        {"kind": "KIND_CPU", "count": 2},
        {"routing_policy": "x" * 100_000},
        "unknown routing policy '" + "x" * 64 + "'; available: least_outstanding, prefix_affinity",
    ),
]


def test_bad_replica_configs_fail_their_load_naming_the_key(dp_server: ServerProcess) -> None:
    with dp_server.client() as client:
        for group, parameters, expected in BAD_CONFIGS:
            config = {"instance_group": [group], "parameters": {"weights": "tiny-llama", **parameters}}
            with pytest.raises(InferenceServerException) as info:
                client.load_model(MODEL, config=json.dumps(config))
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            # Triton's text for a version whose backend refused to load it, then ours.
            message = info.value.message()
            assert message.startswith(f"load failed for model '{MODEL}': version 1 is at UNAVAILABLE")
            assert expected in message and len(message) < 1000
            assert len(engine_processes(dp_server)) <= 2  # nothing was started for a refused config
        # The server still serves: the repository's own config loads again, with its two replicas.
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
        result = client.infer(MODEL, inputs("still here", 2)[:1])
        assert b"still here" in result.as_numpy("text_output")[0]
    assert len(engine_processes(dp_server)) == 2


def test_a_dead_replica_fails_only_its_own_requests(dp_server: ServerProcess) -> None:
    streams = Streams(dp_server)
    ids = [f"k{i}" for i in range(4)]
    try:
        streams.send(ids, max_tokens=600)
        streams.pump_until(lambda: streams.started(ids))
        engines = engine_processes(dp_server)
        assert len(engines) == 2, engines
        os.kill(engines[0].pid, signal.SIGKILL)
        streams.pump_until(lambda: streams.done >= set(ids))
    finally:
        streams.close()
    failed = sorted(streams.errors)
    assert len(failed) == 2, (failed, streams.text)  # the killed replica's two requests
    for request_id in failed:
        # In-band stream errors carry only the message (Triton's): the engine's UNAVAILABLE reason.
        assert (
            "the engine process exited unexpectedly (exit code -9); retry"
            in streams.errors[request_id].message()
        )
    assert all(streams.text[r] for r in set(ids) - set(failed))  # the survivor's two ran to the end
    with dp_server.client() as client:  # the model never stopped serving
        assert client.is_model_ready(MODEL)
        result = client.infer(MODEL, inputs("after the crash", 4)[:1])
        assert b"after the crash" in result.as_numpy("text_output")[0]
    deadline = time.monotonic() + WAIT
    while replica_samples(dp_server)["up"] != [1, 1]:  # the dead replica restarts and rejoins
        assert time.monotonic() < deadline, replica_samples(dp_server)
        time.sleep(0.2)
    assert sum(replica_samples(dp_server)["restarts"]) == 1
