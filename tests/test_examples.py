"""The stock example models: their execute semantics in-process, then end to end through a real
server and the stock ``tritonclient``, the way Triton's example clients drive them."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from pagedserve.backend import LoadContext, Model, ModelSpec
from pagedserve.config import BackendSettings
from pagedserve.inference import InferenceRequest
from pagedserve.repository import ModelRepository
from pagedserve.statistics import ModelStats
from pagedserve_plugins.python_backend import PythonBackend
from pagedserve_plugins.sequence_batching import SequencePolicy

from tests.conftest import REPO, STOCK_MODELS, statistics_after_execution
from tests.recorder import Recorder

MODELS = REPO / "conf" / "models"
EXAMPLES = STOCK_MODELS
WAIT = 10.0


def spec(name: str) -> ModelSpec:
    return ModelRepository(MODELS).read(name)


def load(name: str) -> tuple[ModelSpec, Model]:
    model_spec = spec(name)
    PythonBackend.auto_complete(model_spec.config)
    return model_spec, PythonBackend().load(model_spec, LoadContext(version=1, settings=BackendSettings()))


def run(name: str, inputs: dict[str, np.ndarray], outputs: list[str], **fields: Any) -> Recorder:
    _, model = load(name)
    recorder = Recorder()
    request = InferenceRequest(name, 1, inputs, outputs, recorder, **fields)
    model.execute([request])
    assert recorder.done.wait(WAIT)
    return recorder


# -- in-process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_yaml_loads_and_documents_itself(name: str) -> None:
    text = (MODELS / f"{name}.yaml").read_text()
    assert text.startswith(f"# {name}: ")
    model_spec, model = load(name)
    assert model_spec.config.name == name and model_spec.versions == (1,)
    model.finalize()


def test_simple_adds_and_subtracts() -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.ones((2, 16), np.int32)
    outputs = run("simple", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"], batch_size=2).final().outputs
    assert outputs["OUTPUT0"].dtype == np.int32
    assert (outputs["OUTPUT0"] == a + 1).all() and (outputs["OUTPUT1"] == a - 1).all()


def test_simple_int8_wraps_around() -> None:
    a = np.full((1, 16), 127, np.int8)
    b = np.full((1, 16), -128, np.int8)
    outputs = run("simple_int8", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"]).final().outputs
    assert outputs["OUTPUT0"].dtype == np.int8
    assert outputs["OUTPUT0"][0, 0] == -1 and outputs["OUTPUT1"][0, 0] == -1  # 127 - (-128) wraps to -1


def test_simple_string_works_on_decimal_strings() -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    outputs = run("simple_string", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"]).final().outputs
    assert [int(x) for x in outputs["OUTPUT0"][0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in outputs["OUTPUT1"][0]] == [i - 1 for i in range(16)]
    assert isinstance(outputs["OUTPUT0"][0, 0], bytes)


@pytest.mark.parametrize("value", [b"x", b"99999999999999999999", b"-99999999999999999999", b"\xff\xfe"])
def test_simple_string_rejects_non_numbers(value: bytes) -> None:
    a = np.array([[value] * 16], dtype=np.object_)
    error = run("simple_string", {"INPUT0": a, "INPUT1": a}, ["OUTPUT0"]).final().error
    assert error is not None and "decimal integer" in error.message
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT  # the client's mistake, not INTERNAL


def test_simple_identity_keeps_binary_data() -> None:
    data = np.array([[b"\x00abc\x00", bytes(range(256)), b""]], dtype=np.object_)
    outputs = run("simple_identity", {"INPUT0": data}, ["OUTPUT0"]).final().outputs
    assert outputs["OUTPUT0"].tolist() == data.tolist()


def test_identity_fp32() -> None:
    data = np.array([[0.5, -1.25, 3.0]], np.float32)
    outputs = run("identity_fp32", {"INPUT0": data}, ["OUTPUT0"]).final().outputs
    assert outputs["OUTPUT0"].dtype == np.float32 and outputs["OUTPUT0"].tolist() == data.tolist()


def repeat_inputs(values: list[int], delays: list[int] | None = None, wait: int = 0) -> dict[str, np.ndarray]:
    return {
        "IN": np.array(values, np.int32),
        "DELAY": np.array(delays if delays is not None else [0] * len(values), np.uint32),
        "WAIT": np.array([wait], np.uint32),
    }


def test_repeat_sends_one_response_per_element_then_an_empty_final() -> None:
    recorder = run("repeat_int32", repeat_inputs([4, 2, 0, 1], delays=[1, 1, 1, 1]), ["OUT", "IDX"])
    *responses, (last, final) = recorder.sent
    assert last is None and final
    assert [r.outputs["OUT"].tolist() for r, _ in responses] == [[4], [2], [0], [1]]
    assert [r.outputs["IDX"].tolist() for r, _ in responses] == [[0], [1], [2], [3]]
    assert responses[0][0].outputs["IDX"].dtype == np.uint32 and not any(f for _, f in responses)


def test_repeat_with_no_input_only_finishes() -> None:
    assert run("repeat_int32", repeat_inputs([]), ["OUT", "IDX"]).sent == [(None, True)]


def test_repeat_waits_before_release() -> None:
    started = time.monotonic()
    run("repeat_int32", repeat_inputs([1], wait=150), ["OUT", "IDX"])
    assert time.monotonic() - started >= 0.14


def test_repeat_shape_mismatch_error() -> None:
    recorder = run("repeat_int32", repeat_inputs([1], delays=[0, 0]), ["OUT", "IDX"])
    error = recorder.final().error
    assert error is not None
    assert error.message == "expected IN and DELAY shape to match, got [1] and [2]"


def test_repeat_stops_when_cancelled() -> None:
    _, model = load("repeat_int32")
    recorder = Recorder()
    request = InferenceRequest("repeat_int32", 1, repeat_inputs([1] * 50, [20] * 50), ["OUT"], recorder)
    model.execute([request])
    time.sleep(0.05)
    recorder.is_cancelled = True
    assert recorder.done.wait(WAIT)
    assert len(recorder.sent) < 50
    model.finalize()


@pytest.fixture
def sequence_runner() -> Iterator[Any]:
    policies: list[SequencePolicy] = []

    def submit_sequence(name: str, correlation_id: int, values: list[int]) -> list[int]:
        model_spec, model = load(name)
        policy = SequencePolicy(model, model_spec, ModelStats())
        policies.append(policy)
        recorders = []
        for index, value in enumerate(values):
            recorder = Recorder()
            request = InferenceRequest(
                name,
                1,
                {"INPUT": np.array([[value]], np.int32)},
                ["OUTPUT"],
                recorder,
                sequence_id=correlation_id,
                sequence_start=index == 0,
                sequence_end=index == len(values) - 1,
            )
            policy.submit(request)
            recorders.append(recorder)
        return [int(r.final().outputs["OUTPUT"][0, 0]) for r in recorders]

    yield submit_sequence
    for policy in policies:
        policy.close()


def test_simple_sequence_is_not_an_accumulator(sequence_runner: Any) -> None:
    assert sequence_runner("simple_sequence", 1000, [0, 11, 7, 5, 3, 2, 0, 1]) == [1, 11, 7, 5, 3, 2, 0, 1]


def test_simple_dyna_sequence_adds_the_correlation_id_at_the_end(sequence_runner: Any) -> None:
    assert sequence_runner("simple_dyna_sequence", 1000, [0, 11, 7, 1]) == [1, 11, 7, 1001]


# -- end to end (real server, stock tritonclient) ------------------------------------------------


def _client_modules() -> Any:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    return grpcclient, InferenceServerException


def _simple_inputs(grpcclient: Any, dtype: type = np.int32, datatype: str = "INT32") -> tuple[Any, ...]:
    input0 = np.arange(16, dtype=dtype).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=dtype)
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], datatype),
        grpcclient.InferInput("INPUT1", [1, 16], datatype),
    ]
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    return inputs, input0, input1


def test_client_simple_infer(client: Any) -> None:
    """simple_grpc_infer_client.py"""
    grpcclient, _ = _client_modules()
    inputs, input0, input1 = _simple_inputs(grpcclient)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", inputs, outputs=outputs, request_id="1")
    assert result.get_response().id == "1"
    assert (result.as_numpy("OUTPUT0") == input0 + input1).all()
    assert (result.as_numpy("OUTPUT1") == input0 - input1).all()
    # no requested outputs: all of them come back
    result = client.infer("simple", inputs)
    assert result.as_numpy("OUTPUT0") is not None and result.as_numpy("OUTPUT1") is not None


def test_client_simple_async_infer_batches(client: Any) -> None:
    """simple_grpc_async_infer_client.py, many requests in flight at once (dynamic batching)."""
    grpcclient, _ = _client_modules()
    inputs, input0, input1 = _simple_inputs(grpcclient)
    results: queue.Queue[Any] = queue.Queue()
    for _ in range(16):
        client.async_infer("simple", inputs, callback=lambda result, error: results.put((result, error)))
    for _ in range(16):
        result, error = results.get(timeout=WAIT)
        assert error is None
        assert (result.as_numpy("OUTPUT0") == input0 + input1).all()


def test_client_explicit_int_contents(client: Any) -> None:
    """grpc_explicit_int_content_client.py and grpc_explicit_int8_content_client.py (typed contents)."""
    from tritonclient.grpc import service_pb2

    for model, dtype in (("simple", np.int32), ("simple_int8", np.int8)):
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, values in (("INPUT0", list(range(16))), ("INPUT1", [1] * 16)):
            tensor = request.inputs.add(
                name=name, datatype="INT32" if dtype == np.int32 else "INT8", shape=[1, 16]
            )
            tensor.contents.int_contents.extend(values)
        response = client._client_stub.ModelInfer(request)
        outputs = {o.name: i for i, o in enumerate(response.outputs)}
        out0 = np.frombuffer(response.raw_output_contents[outputs["OUTPUT0"]], dtype=dtype)
        out1 = np.frombuffer(response.raw_output_contents[outputs["OUTPUT1"]], dtype=dtype)
        assert out0.tolist() == [i + 1 for i in range(16)]
        assert out1.tolist() == [i - 1 for i in range(16)]


def test_client_string_and_identity(client: Any) -> None:
    """simple_grpc_string_infer_client.py"""
    grpcclient, _ = _client_modules()
    in0 = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    in1 = np.array([[b"1"] * 16], dtype=np.object_)
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "BYTES"),
        grpcclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(in0)
    inputs[1].set_data_from_numpy(in1)
    result = client.infer("simple_string", inputs)
    assert [int(x) for x in result.as_numpy("OUTPUT0")[0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in result.as_numpy("OUTPUT1")[0]] == [i - 1 for i in range(16)]

    data = np.array([[b"abc\x00def", bytes(range(256)), b""]], dtype=np.object_)
    identity_input = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    identity_input.set_data_from_numpy(data)
    result = client.infer("simple_identity", [identity_input])
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_client_explicit_byte_contents(client: Any) -> None:
    """grpc_explicit_byte_content_client.py"""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="simple_string")
    for name, values in (("INPUT0", [str(i).encode() for i in range(16)]), ("INPUT1", [b"1"] * 16)):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
        tensor.contents.bytes_contents.extend(values)
    response = client._client_stub.ModelInfer(request)
    index = [o.name for o in response.outputs].index("OUTPUT0")
    raw = response.raw_output_contents[index]
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(int(raw[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    assert items == [i + 1 for i in range(16)]


class StreamResults:
    """Collects ``start_stream`` callbacks."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def take(self, count: int) -> list[tuple[Any, Any]]:
        return [self.items.get(timeout=WAIT) for _ in range(count)]


def _repeat_inputs(grpcclient: Any, values: list[int], delays: list[int], wait: int) -> list[Any]:
    arrays = {
        "IN": np.array(values, np.int32),
        "DELAY": np.array(delays, np.uint32),
        "WAIT": np.array([wait], np.uint32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT32" if name == "IN" else "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_client_custom_repeat(server: Any) -> None:
    """simple_grpc_custom_repeat.py: ten responses OUT 100..109 over the stream."""
    grpcclient, _ = _client_modules()
    values = list(range(100, 110))
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results)
        client.async_stream_infer(
            "repeat_int32",
            _repeat_inputs(grpcclient, values, [0] * 10, 0),
            request_id="r",
            enable_empty_final_response=True,
        )
        received = results.take(11)
        client.stop_stream()
    assert all(error is None for _, error in received)
    data = [r for r, _ in received if r.get_response().outputs]
    assert [int(r.as_numpy("OUT")[0]) for r in data] == values
    assert [int(r.as_numpy("IDX")[0]) for r in data] == list(range(10))
    assert all(r.get_response().id == "r" for r, _ in received)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in received]
    assert finals == [False] * 10 + [True]


def test_client_repeat_errors(server: Any) -> None:
    grpcclient, exception_type = _client_modules()
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results)
        client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [1], [0, 0], 0))
        ((_, error),) = results.take(1)
        client.stop_stream()
        assert str(error) == "expected IN and DELAY shape to match, got [1] and [2]"
        with pytest.raises(exception_type, match="doesn't support models with decoupled transaction policy"):
            client.infer("repeat_int32", _repeat_inputs(grpcclient, [1], [0], 0))


def _sequence_input(grpcclient: Any, value: int) -> list[Any]:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    return [tensor]


@pytest.mark.parametrize(("model", "last_extra"), [("simple_sequence", 0), ("simple_dyna_sequence", 1)])
def test_client_sequence_stream(request: pytest.FixtureRequest, model: str, last_extra: int) -> None:
    """simple_grpc_sequence_stream_infer_client.py (``-d`` for simple_dyna_sequence): two interleaved
    sequences on one stream."""
    grpcclient, _ = _client_modules()
    server = request.getfixturevalue("server")
    values = [11, 7, 5, 3, 2, 0, 1]
    sequences = {2000: [0, *values], 2001: [100, *(-v for v in values)]}
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results)
        for step in range(len(values) + 1):  # interleaved, as the example sends them asynchronously
            for cid, seq in sequences.items():
                client.async_stream_infer(
                    model,
                    _sequence_input(grpcclient, seq[step]),
                    request_id=f"{cid}_{step}",
                    sequence_id=cid,
                    sequence_start=step == 0,
                    sequence_end=step == len(values),
                )
        received = results.take(2 * (len(values) + 1))
        client.stop_stream()
    assert [str(error) for _, error in received if error is not None] == []
    got = {r.get_response().id: int(r.as_numpy("OUTPUT")[0, 0]) for r, _ in received}
    for cid, seq in sequences.items():
        expected = [seq[0] + 1, *seq[1:]]
        expected[-1] += last_extra * cid  # dyna: + END * CORRID on the last request
        assert [got[f"{cid}_{step}"] for step in range(len(seq))] == expected


def test_client_sequence_stream_string_ids(client: Any) -> None:
    """simple_grpc_sequence_stream_infer_client.py -d: its third sequence has the string ID "1002" and
    goes to simple_string_dyna_sequence, a running sum that adds the ID at the end."""
    grpcclient, _ = _client_modules()
    values = [20, -11, -7, -5, -3, -2, 0, -1]
    results = StreamResults()
    client.start_stream(callback=results)
    for step, value in enumerate(values):
        client.async_stream_infer(
            "simple_string_dyna_sequence",
            _sequence_input(grpcclient, value),
            request_id=f"1002_{step}",
            sequence_id="1002",
            sequence_start=step == 0,
            sequence_end=step == len(values) - 1,
        )
    client.async_stream_infer(
        "simple_string_dyna_sequence",
        _sequence_input(grpcclient, 1),
        sequence_id="SEQ-3",
        sequence_start=True,
        sequence_end=True,
    )
    received = results.take(len(values) + 1)
    client.stop_stream()
    assert [str(error) for _, error in received[:-1] if error is not None] == []
    outputs = [int(result.as_numpy("OUTPUT")[0, 0]) for result, _ in received[:-1]]
    expected = list(np.cumsum(values))
    expected[-1] += 1002  # END adds the correlation ID
    assert outputs == expected
    assert str(received[-1][1]) == "correlation ID 'SEQ-3' is not an integer"


def test_client_sequence_sync_and_errors(client: Any) -> None:
    """simple_grpc_sequence_sync_infer_client.py, plus Triton's sequence errors."""
    grpcclient, exception_type = _client_modules()
    outputs = []
    values = [0, 11, 7, 5, 3, 2, 0, 1]
    for step, value in enumerate(values):
        result = client.infer(
            "simple_sequence",
            _sequence_input(grpcclient, value),
            sequence_id=3000,
            sequence_start=step == 0,
            sequence_end=step == len(values) - 1,
        )
        outputs.append(int(result.as_numpy("OUTPUT")[0, 0]))
    assert outputs == [1, 11, 7, 5, 3, 2, 0, 1]
    with pytest.raises(exception_type) as missing_id:
        client.infer("simple_sequence", _sequence_input(grpcclient, 1))
    assert "must specify a non-zero or non-empty correlation ID" in str(missing_id.value)
    with pytest.raises(exception_type) as no_start:
        client.infer("simple_sequence", _sequence_input(grpcclient, 1), sequence_id=3001)
    assert (
        "inference request for sequence 3001 to model 'simple_sequence' must specify the START flag on the "
        "first request of the sequence"
    ) in str(no_start.value)


def test_client_statistics_after_inference(client: Any) -> None:
    grpcclient, _ = _client_modules()
    inputs, _, _ = _simple_inputs(grpcclient)
    before = client.get_inference_statistics("simple").model_stats[0]
    client.infer("simple", inputs)
    after = statistics_after_execution(client, "simple", before.execution_count + 1)
    assert after.inference_count == before.inference_count + 1
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1


def test_client_identity_fp32(server: Any) -> None:
    grpcclient, _ = _client_modules()
    data = np.array([[0.5, -1.0, 2.25]], np.float32)
    tensor = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    tensor.set_data_from_numpy(data)
    with server.client() as client:
        assert client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0").tolist() == data.tolist()
