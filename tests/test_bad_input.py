"""A few hundred randomized malformed requests: each gets a clear error, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .test_server_api import simple_inputs

DATATYPES = ["INT32", "FP32", "BYTES", "BOOL", "INT8", "UINT64", "FP16", "BF16", "NOPE", ""]
NAMES = ["INPUT0", "INPUT1", "INPUT2", "", "../INPUT0"]
MODELS = ["simple", "simple_string", "simple_identity", "simple", "missing_model", "../simple"]
ERROR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

tensors = st.builds(
    lambda name, datatype, shape: service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    ),
    st.sampled_from(NAMES),
    st.sampled_from(DATATYPES),
    st.lists(st.one_of(st.integers(-3, 20), st.sampled_from([2**40, 2**62, -(2**62)])), max_size=3),
)
raw = st.one_of(
    st.binary(max_size=80), st.sampled_from([b"\x05\x00\x00\x00ab", b"\xff\xff\xff\xff", b"\x00" * 64])
)


@st.composite
def malformed(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS)),
        model_version=draw(st.sampled_from(["", "1", "2", "x", "-1"])),
    )
    request.inputs.extend(draw(st.lists(tensors, max_size=3)))
    request.raw_input_contents.extend(draw(st.lists(raw, max_size=4)))
    for name in draw(st.lists(st.sampled_from(["OUTPUT0", "OUTPUT0", "OUTPUT9"]), max_size=2)):
        request.outputs.add(name=name)
    if draw(st.booleans()):
        request.parameters["priority"].int64_param = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        request.parameters[draw(st.sampled_from(["triton_x", "sequence_id", "k"]))].double_param = 1.0
    return request


@pytest.fixture(scope="module")
def stub(url: str):  # noqa: ANN201
    with grpc.insecure_channel(url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=malformed())
def test_malformed_requests_get_clear_errors(stub, request: service_pb2.ModelInferRequest) -> None:  # noqa: ANN001
    try:
        stub.ModelInfer(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ERROR_CODES, (error.code(), error.details())
        assert error.details()


def test_oversized_payload_rejected_and_server_keeps_serving(stub, client) -> None:  # noqa: ANN001
    request = service_pb2.ModelInferRequest(model_name="simple_identity")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x00" * 10)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    result = client.infer("simple", simple_inputs())
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(16).reshape(1, 16) + 1)


def test_payload_over_the_limit_is_refused() -> None:
    from .conftest import start_server

    server = start_server("model=simple_identity", "server.max_message_bytes=4096")
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="simple_identity")
            request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
            request.raw_input_contents.append(len(b"x" * 8000).to_bytes(4, "little") + b"x" * 8000)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            request.raw_input_contents[0] = b"\x02\x00\x00\x00ok"
            reply = stub.ModelInfer(request, timeout=10)
            assert reply.raw_output_contents[0] == b"\x02\x00\x00\x00ok"
    finally:
        server.stop()


def _bytes_input(name: str, shape: list[int], value: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.full(shape, value, dtype=np.object_))
    return tensor


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        # Decimal strings: they used to be parsed as numbers and ranked.
        ("simple_string", [_bytes_input("INPUT0", [1, 16], b"1"), _bytes_input("INPUT1", [1, 16], b"2")]),
        ("simple_identity", [_bytes_input("INPUT0", [1, 2], b"a")]),  # was INTERNAL
    ],
    ids=["simple_string", "simple_identity"],
)
def test_classification_of_a_bytes_output_is_invalid(client, model: str, inputs: list) -> None:  # noqa: ANN001
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "class result not available for output due to unsupported type 'BYTES'" in info.value.message()


def _fp32_input(data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def test_classification_of_an_empty_batch_is_empty(client) -> None:  # noqa: ANN001
    # The rows were reshaped with -1, which numpy cannot infer for zero rows: INTERNAL.
    result = client.infer(
        "identity_fp32",
        [_fp32_input(np.empty((0, 4), np.float32))],
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)],
    )
    assert result.as_numpy("OUTPUT0").shape == (0, 2)


def test_classification_of_more_than_a_million_elements_is_invalid(client) -> None:  # noqa: ANN001
    # Triton's limit on what it sorts per batch entry; a million are still ranked.
    top = grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)
    ranked = client.infer(
        "identity_fp32", [_fp32_input(np.arange(10**6, dtype=np.float32)[None])], outputs=[top]
    )
    assert ranked.as_numpy("OUTPUT0").tolist() == [[b"999999.000000:999999", b"999998.000000:999998"]]
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_fp32", [_fp32_input(np.ones((1, 10**6 + 1), np.float32))], outputs=[top])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "classification output tensor too large" in info.value.message()
