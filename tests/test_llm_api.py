"""The LLM model through tritonclient, the way Triton's vLLM backend is used (sample client style)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server

MODEL = "tiny-llama"
PROMPT = "The scheduler hands out tokens"


@pytest.fixture(scope="module")
def llm_server() -> Iterator[ServerProcess]:
    server = start_server(f"model={MODEL}", "cache.num_blocks=256", "scheduler.max_num_seqs=8")
    yield server
    server.stop()


@pytest.fixture
def client(llm_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with llm_server.client() as c:
        yield c


def llm_inputs(
    prompt: str = PROMPT,
    stream: bool | None = None,
    sampling: dict | None = None,
    exclude: bool | None = None,
    **flags: bool,
) -> list[grpcclient.InferInput]:
    def tensor(name: str, value: object, datatype: str) -> grpcclient.InferInput:
        array = np.array([value], dtype=np.object_ if datatype == "BYTES" else bool)
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("text_input", prompt.encode(), "BYTES")]
    if stream is not None:
        inputs.append(tensor("stream", stream, "BOOL"))
    if sampling is not None:
        inputs.append(tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"))
    if exclude is not None:
        inputs.append(tensor("exclude_input_in_output", exclude, "BOOL"))
    for name, value in flags.items():
        inputs.append(tensor(name, value, "BOOL"))
    return inputs


def stream_all(client: grpcclient.InferenceServerClient, requests: list[tuple[str, list]]) -> dict[str, list]:
    """Send requests on one stream; collect (result, error) per request id until each is final."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, inputs in requests:
        client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)
    by_id: dict[str, list] = {rid: [] for rid, _ in requests}
    pending = set(by_id)
    while pending:
        result, error = results.get(timeout=60)
        if error is not None:
            raise error
        response = result.get_response()
        by_id[response.id].append(result)
        if response.parameters["triton_final_response"].bool_param:
            pending.discard(response.id)
    client.stop_stream()
    return by_id


def text(result: grpcclient.InferResult) -> str:
    return b"".join(result.as_numpy("text_output")).decode()


def test_config_is_auto_completed(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL).config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert {i.name for i in config.input} >= {
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
    }
    assert {o.name for o in config.output} >= {"text_output", "finish_reason", "num_output_tokens"}


def test_streaming_deltas_add_up_to_the_whole_text(client: grpcclient.InferenceServerClient) -> None:
    greedy = {"temperature": "0", "max_tokens": "12", "ignore_eos": "true"}
    out = stream_all(
        client,
        [
            ("s", llm_inputs(stream=True, sampling=greedy, exclude=True)),
            ("u", llm_inputs(stream=False, sampling=greedy)),
        ],
    )
    streamed = [text(r) for r in out["s"] if r.as_numpy("text_output") is not None]
    assert len(streamed) > 1  # really streamed
    assert len(out["u"]) == 1
    whole = text(out["u"][0])
    assert whole.startswith(PROMPT)  # exclude_input_in_output defaults to false without streaming
    assert "".join(streamed) == whole[len(PROMPT) :]


def test_unary_infer_returns_the_whole_text(client: grpcclient.InferenceServerClient) -> None:
    sampling = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    result = client.infer(
        MODEL,
        llm_inputs(sampling=sampling, exclude=True, return_num_output_tokens=True, return_finish_reason=True),
    )
    assert result.as_numpy("num_output_tokens").tolist() == [8]
    assert result.as_numpy("finish_reason").tolist() == [b"length"]
    again = client.infer(MODEL, llm_inputs(sampling=sampling, exclude=True))
    assert text(again) == text(result)


def test_streaming_over_unary_is_refused(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="use ModelStreamInfer"):
        client.infer(MODEL, llm_inputs(stream=True, sampling={"max_tokens": 8, "ignore_eos": True}))


def test_additional_outputs(client: grpcclient.InferenceServerClient) -> None:
    flags = dict.fromkeys(
        [
            "return_finish_reason",
            "return_cumulative_logprob",
            "return_logprobs",
            "return_num_input_tokens",
            "return_num_output_tokens",
        ],
        True,
    )
    sampling = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 2}
    out = stream_all(client, [("a", llm_inputs(stream=True, sampling=sampling, **flags))])["a"]
    finals = [r for r in out if r.as_numpy("finish_reason") is not None]
    assert [r.as_numpy("finish_reason").tolist() for r in finals][-1] == [b"length"]
    assert all(r.as_numpy("finish_reason").tolist() == [b"None"] for r in finals[:-1])
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in finals) == 6
    assert int(finals[0].as_numpy("num_input_tokens")) > 0
    steps = [step for r in finals for step in json.loads(r.as_numpy("logprobs")[0])]
    assert len(steps) == 6
    for step in steps:
        assert 1 <= len(step) <= 3
        for entry in step.values():
            assert set(entry) == {"logprob", "rank", "decoded_token"} and entry["logprob"] <= 0
    assert float(finals[-1].as_numpy("cumulative_logprob")[0]) <= 0


def test_optional_outputs_absent_unless_asked(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(MODEL, llm_inputs(sampling={"max_tokens": 2}))
    assert result.as_numpy("finish_reason") is None and result.as_numpy("num_output_tokens") is None


def test_sampling_parameters_from_request_parameters(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        MODEL,
        llm_inputs(exclude=True, return_num_output_tokens=True),
        parameters={"max_tokens": "5", "temperature": "0.1", "ignore_eos": "true"},
    )
    assert result.as_numpy("num_output_tokens").tolist() == [5]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            lambda: llm_inputs(stream=True, exclude=False),
            "Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed.",
        ),
        (lambda: llm_inputs(sampling={"temperature": "hot"}), "Error generating stream:"),
        (lambda: llm_inputs(prompt="word " * 3000), "Error generating stream:"),  # longer than the context
        (lambda: llm_inputs(sampling={"n": 0}), "Error generating stream:"),
    ],
)
def test_bad_requests_error_in_band(client: grpcclient.InferenceServerClient, inputs, message: str) -> None:  # noqa: ANN001
    errors: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    client.async_stream_infer(MODEL, inputs(), request_id="bad")
    error = errors.get(timeout=30)
    client.stop_stream()
    assert error is not None and message in str(error)
    assert client.is_model_ready(MODEL)


def test_cancelled_stream_leaves_server_serving(llm_server: ServerProcess) -> None:
    with llm_server.client() as client:
        seen: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: seen.put((result, error)))
        for i in range(4):
            client.async_stream_infer(
                MODEL,
                llm_inputs(stream=True, sampling={"max_tokens": 400, "ignore_eos": True}),
                request_id=str(i),
            )
        seen.get(timeout=30)
        client.stop_stream(cancel_requests=True)
    with llm_server.client() as client:
        result = client.infer(MODEL, llm_inputs(sampling={"max_tokens": 3}, return_num_output_tokens=True))
        assert result.as_numpy("num_output_tokens").tolist() == [3]


def test_request_priority_reaches_the_scheduler() -> None:
    """One sequence at a time under the priority policy: a later priority-1 request overtakes an
    earlier one with no priority (0 = the default level, after explicit ones).

    Event-driven, so a slow machine only makes it slower: "first" takes the single seat and holds it
    (it may run 2000 tokens), "default" then "urgent" queue behind it, and only once the engine
    reports both waiting is "first" cancelled, so the two compete for the freed seat. The timeouts
    only guard against a hang."""
    from .test_metrics import metrics_port, scrape, value  # here: test_metrics imports this module

    server = start_server(
        f"model={MODEL}", "scheduler=priority", "scheduler.max_num_seqs=1", "cache.num_blocks=160"
    )
    try:
        with server.client() as holder, server.client() as client:
            first_started, first_ended = threading.Event(), threading.Event()

            def on_first(result, error) -> None:  # noqa: ANN001
                if error is not None or _is_final(result):
                    first_ended.set()
                first_started.set()

            holder.start_stream(callback=on_first)
            hold = {"temperature": 0, "max_tokens": 2000, "ignore_eos": True}
            holder.async_stream_infer(MODEL, llm_inputs(stream=True, sampling=hold), request_id="first")
            assert first_started.wait(120) and not first_ended.is_set()  # it is running: it holds the seat

            finished: queue.Queue = queue.Queue()

            def on_result(result, error) -> None:  # noqa: ANN001
                if error is not None or _is_final(result):
                    finished.put(error or result)

            client.start_stream(callback=on_result)
            for request_id, priority in (("default", 0), ("urgent", 1)):
                sampling = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
                client.async_stream_infer(
                    MODEL,
                    llm_inputs(sampling=sampling),
                    request_id=request_id,
                    priority=priority,
                    enable_empty_final_response=True,
                )
            # the engine reports its queues with each step's outputs, and "first" keeps it stepping
            port, deadline = metrics_port(server), time.monotonic() + 120
            while value(scrape(port)[1], "vllm:num_requests_waiting", model=MODEL, version="1") < 2:
                assert time.monotonic() < deadline, "the later requests never both waited behind 'first'"
                time.sleep(0.05)
            assert not first_ended.is_set(), "'first' ended before the later requests queued"
            holder.stop_stream(cancel_requests=True)  # frees the seat with both requests queued
            order = []
            for _ in range(2):
                event = finished.get(timeout=120)
                assert not isinstance(event, Exception), event
                order.append(event.get_response().id)
            client.stop_stream()
        assert order == ["urgent", "default"]
    finally:
        server.stop()


def _is_final(result: grpcclient.InferResult) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def test_vllm_sample_client_flow(llm_server: ServerProcess) -> None:
    """What the Triton vLLM backend's samples/client.py does: tritonclient.grpc.aio ``stream_infer``
    over an async iterator of request dicts, streaming, sampling parameters as request parameters."""
    import asyncio

    import tritonclient.grpc.aio as aioclient

    prompts = ["Hello, my name is", "The most dangerous animal is", "The capital of France is"]
    sampling = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "20"}

    async def run() -> dict[str, str]:
        async with aioclient.InferenceServerClient(llm_server.url) as client:

            async def requests():  # noqa: ANN202
                for i, prompt in enumerate(prompts):
                    yield {
                        "model_name": MODEL,
                        "inputs": llm_inputs(prompt, stream=True, sampling=sampling, exclude=True),
                        "outputs": [aioclient.InferRequestedOutput("text_output")],
                        "request_id": str(i),
                        "parameters": sampling,
                    }

            texts: dict[str, str] = {str(i): "" for i in range(len(prompts))}
            async for result, error in client.stream_infer(inputs_iterator=requests(), stream_timeout=60):
                assert error is None, error
                texts[result.get_response().id] += text(result)
            return texts

    texts = asyncio.run(run())
    assert all(texts.values())


def test_float8_weights_and_cache_serve_through_the_server() -> None:
    """``engine.quantization=fp8 cache.dtype=fp8`` reach the engine's own process, which answers a
    greedy request to its full length."""
    server = start_server(
        f"model={MODEL}", "engine.quantization=fp8", "cache.dtype=fp8", "cache.num_blocks=64"
    )
    try:
        with server.client() as client:
            sampling = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
            result = client.infer(
                MODEL, llm_inputs(sampling=sampling, exclude=True, return_num_output_tokens=True)
            )
            assert result.as_numpy("num_output_tokens").tolist() == [12]
            assert text(result)
        assert "fp8 linear weights" in server.output and "float8_e4m3fn" in server.output
    finally:
        server.stop()
