"""BLS (python models calling other models with Triton's ``pb_utils`` names) through tritonclient:
the shipped examples (sync, async, streaming from the LLM), errors as responses, and hostile calls
(recursion, fan-out, timeouts) that must end with an answer while the server goes on serving."""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from .conftest import REPO, ServerProcess, start_server

SHIPPED = ["simple", "repeat_int32", "tiny-llama", "bls_add_sub", "bls_add_sub_async", "bls_llm_stream"]


def _python_model(cls: str, inputs: list[dict], outputs: list[dict]) -> dict:
    return {
        "backend": "python",
        "max_batch_size": 0,
        "input": inputs,
        "output": outputs,
        "parameters": {"python_class": f"tests.bls_test_models:{cls}"},
    }


def _scalar(name: str, dtype: str = "TYPE_INT32") -> dict:
    return {"name": name, "data_type": dtype, "dims": [1]}


TEST_MODELS = {
    "recursive_bls": _python_model("RecursiveBls", [_scalar("N")], [_scalar("DEPTH")]),
    "fan_out_bls": _python_model("FanOutBls", [_scalar("COUNT")], [_scalar("TOTAL", "TYPE_INT64")]),
    "slow_call_bls": _python_model(
        "SlowCallBls", [_scalar("DELAY_MS"), _scalar("TIMEOUT_US")], [_scalar("COUNT")]
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository: Path = tmp_path_factory.mktemp("bls")
    for name in SHIPPED:
        shutil.copy(REPO / "conf" / "models" / f"{name}.yaml", repository)
    for name, document in TEST_MODELS.items():
        (repository / f"{name}.yaml").write_text(yaml.safe_dump(document))
    models = ",".join([*SHIPPED, *TEST_MODELS])
    process = start_server(f"repository={repository}", f"model=[{models}]", "cache.num_blocks=128")
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with server.client() as c:
        yield c


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    datatype = {np.dtype(np.int32): "INT32"}.get(value.dtype, "BYTES")
    tensor = grpcclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _add_sub_inputs(a: np.ndarray, b: np.ndarray, model: str | None = None) -> list[grpcclient.InferInput]:
    inputs = [_input("INPUT0", a), _input("INPUT1", b)]
    if model is not None:
        inputs.append(_input("MODEL_NAME", np.array([model.encode()], dtype=np.object_)))
    return inputs


A = np.arange(32, dtype=np.int32).reshape(2, 16)
B = np.full((2, 16), 5, dtype=np.int32)


def test_sync_exec_calls_the_model(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple").model_stats[0].inference_stats.success.count
    result = client.infer("bls_add_sub", _add_sub_inputs(A, B))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    after = client.get_inference_statistics("simple").model_stats[0].inference_stats.success.count
    assert after == before + 1  # the call counts in the called model's statistics


def test_async_exec_runs_calls_side_by_side(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("bls_add_sub_async", _add_sub_inputs(A, B))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), B - A)


def test_decoupled_exec_streams_from_the_llm(client: grpcclient.InferenceServerClient) -> None:
    prompt = np.array([b"The scheduler hands out tokens"], dtype=np.object_)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = [_input("PROMPT", prompt), _input("MAX_TOKENS", np.array([8], dtype=np.int32))]
        client.async_stream_infer("bls_llm_stream", inputs, enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.as_numpy("TEXT") is not None:
                pieces.append(result.as_numpy("TEXT")[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    direct = client.infer(
        "tiny-llama",
        [
            _input("text_input", prompt),
            _input(
                "sampling_parameters", np.array([b'{"max_tokens": 8, "temperature": 0}'], dtype=np.object_)
            ),
        ],
    )
    assert len(pieces) > 1
    assert b"".join(pieces) == direct.as_numpy("text_output")[0][len(prompt[0]) :]


@pytest.mark.parametrize(
    ("model", "inputs", "status", "message"),
    [
        (
            "no_such_model",
            _add_sub_inputs(A, B),
            "NOT_FOUND",
            "Request for unknown model: 'no_such_model' is not found",
        ),
        (
            "simple",
            _add_sub_inputs(A[:, :8], B[:, :8]),
            "INVALID_ARGUMENT",
            "unexpected shape for input 'INPUT0'",
        ),
        (
            "simple",
            _add_sub_inputs(np.zeros((9, 16), np.int32), B[:1]),
            "INVALID_ARGUMENT",
            "batch-size must be <= 8",
        ),
        ("repeat_int32", _add_sub_inputs(A, B), "INVALID_ARGUMENT", "unexpected inference input 'INPUT0'"),
    ],
)
def test_a_failed_call_is_an_error_response(
    client: grpcclient.InferenceServerClient, model: str, inputs: list, status: str, message: str
) -> None:
    named = [*inputs[:2], _input("MODEL_NAME", np.array([model.encode()], dtype=np.object_))]
    with pytest.raises(InferenceServerException, match=message.replace("(", r"\(")) as caught:
        client.infer("bls_add_sub", named)
    assert caught.value.status() == f"StatusCode.{status}"
    assert client.infer("bls_add_sub", _add_sub_inputs(A, B)) is not None  # the model still serves


def test_a_model_calling_itself_gets_an_error_instead_of_waiting(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.infer("recursive_bls", [_input("N", np.array([0], np.int32))]).as_numpy(
        "DEPTH"
    ).tolist() == [0]
    with pytest.raises(InferenceServerException, match=r"already running this request's caller chain"):
        client.infer("recursive_bls", [_input("N", np.array([3], np.int32))], client_timeout=30)
    assert client.infer("recursive_bls", [_input("N", np.array([0], np.int32))]) is not None


def test_huge_fan_out_completes(client: grpcclient.InferenceServerClient) -> None:
    count = 500
    result = client.infer("fan_out_bls", [_input("COUNT", np.array([count], np.int32))], client_timeout=120)
    assert result.as_numpy("TOTAL").tolist() == [count * 16 * 2]


def test_timeout_ends_the_call_with_an_error(client: grpcclient.InferenceServerClient) -> None:
    inputs = [
        _input("DELAY_MS", np.array([2000], np.int32)),
        _input("TIMEOUT_US", np.array([100_000], np.int32)),
    ]
    with pytest.raises(InferenceServerException, match="Request timeout expired") as caught:
        client.infer("slow_call_bls", inputs, client_timeout=30)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    quick = [
        _input("DELAY_MS", np.array([1], np.int32)),
        _input("TIMEOUT_US", np.array([10_000_000], np.int32)),
    ]
    assert client.infer("slow_call_bls", quick).as_numpy("COUNT").tolist() == [3]
