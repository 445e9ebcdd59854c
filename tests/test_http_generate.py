"""Triton's generate extension on the LLM model with plain HTTP, as the vLLM backend's README uses it:
the same answers as gRPC, server-sent events, errors, and cancellation when the client goes away."""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from .conftest import ServerProcess, start_server

MODEL = "tiny-llama"
PROMPT = "The scheduler hands out tokens"


@pytest.fixture(scope="module")
def llm_server() -> Iterator[ServerProcess]:
    server = start_server(
        "frontends=[grpc,http]", f"model={MODEL}", "cache.num_blocks=256", "scheduler.max_num_seqs=8"
    )
    yield server
    server.stop()


def connect(server: ServerProcess) -> http.client.HTTPConnection:
    host, port = server.http_url.split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def generate(server: ServerProcess, request: dict, stream: bool = False) -> tuple[int, str, bytes]:
    connection = connect(server)
    try:
        path = f"/v2/models/{MODEL}/generate" + ("_stream" if stream else "")
        connection.request("POST", path, body=json.dumps(request))
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def events(body: bytes) -> list[dict]:
    assert body.endswith(b"\n\n")
    return [json.loads(chunk.removeprefix(b"data: ")) for chunk in body.split(b"\n\n") if chunk]


def grpc_text(server: ServerProcess, sampling: dict) -> str:
    def tensor(name: str, value: object, datatype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        return t

    inputs = [
        tensor("text_input", PROMPT.encode(), "BYTES"),
        tensor("stream", False, "BOOL"),
        tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
    ]
    with server.client() as client:
        return client.infer(MODEL, inputs).as_numpy("text_output")[0].decode()


def test_generate_as_in_the_vllm_backend_readme(llm_server: ServerProcess) -> None:
    request = {"text_input": PROMPT, "parameters": {"stream": False, "temperature": 0, "max_tokens": 12}}
    status, media, body = generate(llm_server, request)
    assert status == 200 and media == "application/json"
    answer = json.loads(body)
    assert list(answer) == sorted(answer)  # Triton's keys come out of a std::map
    assert answer["model_name"] == MODEL and answer["model_version"] == "1"
    assert answer["text_output"] == grpc_text(llm_server, {"temperature": 0, "max_tokens": 12})
    assert answer["text_output"].startswith(PROMPT)  # stream=false: prompt included, as vLLM's backend


def test_generate_stream_events_add_up(llm_server: ServerProcess) -> None:
    request = {
        "id": "s1",
        "text_input": PROMPT,
        "parameters": {"stream": True, "temperature": 0, "max_tokens": 12},
    }
    status, media, body = generate(llm_server, request, stream=True)
    assert status == 200 and media == "text/event-stream; charset=utf-8"
    pieces = events(body)
    assert len(pieces) > 1 and all(p["id"] == "s1" for p in pieces)
    whole = grpc_text(llm_server, {"temperature": 0, "max_tokens": 12})
    assert PROMPT + "".join(p["text_output"] for p in pieces) == whole


def test_generate_errors(llm_server: ServerProcess) -> None:
    # Several responses are not one: Triton's message, on the non-streaming route only. Enough tokens
    # that a busy machine's output thread cannot fold them all into one response.
    request = {"text_input": PROMPT, "parameters": {"stream": True, "max_tokens": 64, "ignore_eos": True}}
    status, _, body = generate(llm_server, request)
    assert (
        status == 400 and "generate expects model to produce exactly 1 response" in json.loads(body)["error"]
    )
    bad = {"text_input": PROMPT, "parameters": {"temperature": -3}}
    status, _, body = generate(llm_server, bad)
    assert status == 400 and "temperature" in json.loads(body)["error"]
    # On the stream the first response decides the status; the error is an event.
    status, media, body = generate(llm_server, bad, stream=True)
    assert status == 400 and media.startswith("text/event-stream")
    assert "temperature" in events(body)[0]["error"]
    status, _, body = generate(llm_server, {"text_input": PROMPT, "parameters": {"no_such": 1}})
    assert status == 400 and "no_such" in json.loads(body)["error"]
    status, _, _ = generate(llm_server, {"text_input": PROMPT, "parameters": {"max_tokens": 2}})
    assert status == 200  # still serving


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    """The first sample of ``name`` whose labels contain ``labels``."""
    port = server.port_of("metrics")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    pattern = rf"^{re.escape(name)}(?:{{[^}}]*{re.escape(labels)}[^}}]*}})? (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def _running_soon(server: ServerProcess) -> bool:
    deadline = time.monotonic() + 20
    while not metric(server, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    return metric(server, "vllm:num_requests_running") == 1


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
def test_disconnect_cancels_and_frees_blocks(llm_server: ServerProcess, route: str) -> None:
    """The stream notices when its next event cannot be written; a unary generate, which writes
    nothing until the end, by the watch on its connection."""
    request = {
        "text_input": PROMPT,
        "parameters": {"stream": route == "generate_stream", "max_tokens": 100_000, "ignore_eos": True},
    }
    cancelled = metric(llm_server, "nv_inference_request_failure", 'reason="CANCELED"')
    connection = connect(llm_server)
    connection.request("POST", f"/v2/models/{MODEL}/{route}", body=json.dumps(request))
    if route == "generate_stream":
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # generating
    assert _running_soon(llm_server)
    connection.sock.close()  # the client goes away mid-generation
    connection.close()
    deadline = time.monotonic() + 20
    while metric(llm_server, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(llm_server, "vllm:num_requests_running") == 0
    # Stopped by the disconnect, not by running into the model's length: it counts as cancelled.
    assert metric(llm_server, "nv_inference_request_failure", 'reason="CANCELED"') == cancelled + 1
    assert metric(llm_server, "vllm:kv_cache_usage_perc") == 0.0  # its blocks are free again
    status, _, _ = generate(llm_server, {"text_input": PROMPT, "parameters": {"max_tokens": 2}})
    assert status == 200
