"""One LLM client cannot hurt the others, through the stock tritonclient: a request is checked before
it costs anything and refused with INVALID_ARGUMENT naming the parameter; a bad one never fails its
neighbours; a burst of ``n > 1`` requests stays within ``max_num_seqs``; ``max_waiting`` answers
UNAVAILABLE; and an engine process that dies is restarted."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server, statistics_after_execution

MODEL = "tiny-llama"
_ENGINE_PID = re.compile(r"LLM engine process (\d+) is ready")


@pytest.fixture(scope="module")
def llm_server():
    server = start_server(
        f"model={MODEL}", "cache.num_blocks=256", "scheduler.max_num_seqs=4", "engine.max_prompt_bytes=65536"
    )
    yield server
    server.stop()


def inputs(
    prompt: str = "The scheduler hands out tokens", sampling: dict | str | None = None, stream: bool = False
):  # noqa: ANN201
    def tensor(name: str, value: object, datatype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        return t

    text = sampling if isinstance(sampling, str) else json.dumps(sampling or {})
    return [
        tensor("text_input", prompt.encode(), "BYTES"),
        tensor("sampling_parameters", text.encode(), "BYTES"),
        tensor("stream", stream, "BOOL"),
        tensor("exclude_input_in_output", True, "BOOL"),
        tensor("return_num_output_tokens", True, "BOOL"),
    ]


def _refusal(client: grpcclient.InferenceServerClient, request_inputs: list) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, request_inputs)
    return error.value


def _tokens(result: grpcclient.InferResult) -> list[int]:
    return result.as_numpy("num_output_tokens").tolist()


def _start_stream(client: grpcclient.InferenceServerClient, max_tokens: int) -> tuple[queue.Queue, int]:
    """A long greedy stream, once its first piece arrived: its queue of (result, error), and the
    tokens of that first piece."""
    seen: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: seen.put((result, error)))
    sampling = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    client.async_stream_infer(MODEL, inputs(sampling=sampling, stream=True), request_id="long")
    result, error = seen.get(timeout=60)
    assert error is None, error
    return seen, sum(_tokens(result))


def _streamed_tokens(seen: queue.Queue) -> int:
    """Tokens of a stream until its final response (raises its error)."""
    total = 0
    while True:
        result, error = seen.get(timeout=60)
        if error is not None:
            raise error
        total += sum(_tokens(result))
        if result.get_response().parameters["triton_final_response"].bool_param:
            return total


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        # Each passed validation and then raised inside the engine's step, failing every neighbour.
        ({"seed": 2**64}, "sampling parameter seed must be null or in [-9223372036854775808, "),
        ({"seed": -(2**63) - 1}, "sampling parameter seed must be null or in"),
        ({"seed": 1e300}, "sampling parameter seed must be null or in"),
        (
            {"stop_token_ids": [-1000000], "min_tokens": 2},
            "sampling parameter stop_token_ids must be token ids in",
        ),
        # Built n per-choice objects before it was checked: 21.7 GB and the kernel's OOM killer.
        ({"n": 10**9}, "sampling parameter n must be in [1, 4]"),
        ({"logprobs": 10**6}, "sampling parameter logprobs must be null or in [0, 20]"),
        # A RecursionError, answered INTERNAL.
        ('{"stop": ' + "[" * 50_000 + "]" * 50_000 + "}", "sampling parameters nest too deeply"),
    ],
)
def test_a_bad_sampling_parameter_is_invalid_argument_naming_it(llm_server: ServerProcess, sampling, message):  # noqa: ANN001
    with llm_server.client() as client:
        error = _refusal(client, inputs(sampling=sampling))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and message in error.message()
        assert client.is_model_ready(MODEL)
        assert _tokens(client.infer(MODEL, inputs(sampling={"max_tokens": 3, "ignore_eos": True}))) == [3]


def test_a_prompt_over_max_prompt_bytes_is_invalid_argument(llm_server: ServerProcess) -> None:
    with llm_server.client() as client:
        error = _refusal(client, inputs(prompt="w" * 65537))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "65537 bytes; engine.max_prompt_bytes allows 65536" in error.message()


def test_a_bad_request_fails_alone(llm_server: ServerProcess) -> None:
    with llm_server.client() as streaming, llm_server.client() as client:
        seen, first = _start_stream(streaming, 300)
        error = _refusal(client, inputs(sampling={"seed": 2**64, "max_tokens": 4}))
        assert "seed" in error.message()
        assert first + _streamed_tokens(seen) == 300  # the bystander ran to its end
        streaming.stop_stream()


def test_a_burst_of_n2_requests_stays_within_max_num_seqs(llm_server: ServerProcess) -> None:
    """With the parents counted as one seat each, the burst forked past max_num_seqs=4 and every
    request in the engine failed ("exceeds the runner's buffers"), the unrelated long one included."""
    with llm_server.client() as streaming, llm_server.client() as client:
        seen, first = _start_stream(streaming, 200)
        finals: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: finals.put((result, error)))
        pair = {"n": 2, "max_tokens": 8, "ignore_eos": True}
        for i in range(12):
            client.async_stream_infer(MODEL, inputs(sampling=pair), request_id=f"pair{i}")
        for _ in range(12):
            result, error = finals.get(timeout=120)
            assert error is None, error
            assert _tokens(result) == [8, 8]
        client.stop_stream()
        assert first + _streamed_tokens(seen) == 200
        streaming.stop_stream()


def test_requests_over_max_waiting_are_unavailable() -> None:
    server = start_server(
        f"model={MODEL}", "cache.num_blocks=256", "scheduler.max_num_seqs=1", "scheduler.max_waiting=1"
    )
    try:
        with server.client() as streaming, server.client() as waiting, server.client() as client:
            _start_stream(streaming, 1500)  # holds the only seat
            waiting.start_stream(callback=lambda result, error: None)
            waiting.async_stream_infer(MODEL, inputs(sampling={"max_tokens": 2}), request_id="waits")
            statistics_after_execution(client, MODEL, 2)  # the waiting request was admitted
            error = _refusal(client, inputs(sampling={"max_tokens": 2}))
            assert (
                error.status() == "StatusCode.UNAVAILABLE" and "Exceeds maximum queue size" in error.message()
            )
            streaming.stop_stream(cancel_requests=True)  # the seat frees, the waiting request runs
            waiting.stop_stream()
            assert _tokens(client.infer(MODEL, inputs(sampling={"max_tokens": 2, "ignore_eos": True}))) == [2]
    finally:
        server.stop()


def test_a_killed_engine_process_is_restarted() -> None:
    server = start_server(f"model={MODEL}", "cache.num_blocks=128")
    try:
        [pid] = _ENGINE_PID.findall(server.output)
        with server.client() as streaming, server.client() as client:
            seen, _ = _start_stream(streaming, 1500)
            os.kill(int(pid), signal.SIGKILL)
            with pytest.raises(InferenceServerException, match="engine process exited unexpectedly"):
                _streamed_tokens(seen)
            streaming.stop_stream()
            # Waits for the new engine process, then runs.
            assert _tokens(client.infer(MODEL, inputs(sampling={"max_tokens": 3, "ignore_eos": True}))) == [3]
            assert client.is_model_ready(MODEL) and client.is_server_ready()
        restarted = _ENGINE_PID.findall(server.output)
        assert len(restarted) == 2 and restarted[1] != pid
        metrics_port = int(server.output.split("metrics listening on 127.0.0.1:")[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as page:
            text = page.read().decode()
        assert re.search(
            r'^pagedserve:engine_restarts_total\{[^}]*model="tiny-llama"[^}]*\} 1\.0$', text, re.M
        ), [line for line in text.splitlines() if "restarts" in line]
    finally:
        server.stop()
