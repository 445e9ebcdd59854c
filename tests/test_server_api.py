"""Black-box API tests through the stock tritonclient against a real server process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import STOCK_MODELS, statistics_after_execution


def simple_inputs(batch: int = 1) -> list[grpcclient.InferInput]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.ones((batch, 16), dtype=np.int32)
    tensors = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = grpcclient.InferInput(name, [batch, 16], "INT32")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "triton"
    assert {"model_repository", "statistics", "sequence"} <= set(metadata.extensions)
    for model in STOCK_MODELS:
        assert client.is_model_ready(model)
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata.name == "simple" and metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    config = client.get_model_config("simple").config
    assert config.name == "simple" and config.max_batch_size == 8
    assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert client.get_model_config("repeat_int32").config.model_transaction_policy.decoupled


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda c: c.get_model_metadata("wrong_model_name"),
            "NOT_FOUND",
            "Request for unknown model: 'wrong_model_name' is not found",
        ),
        (
            lambda c: c.get_model_metadata("simple", "99"),
            "NOT_FOUND",
            "Request for unknown model: 'simple' version 99 is not found",
        ),
        (
            lambda c: c.get_model_config("simple", "abc"),
            "INVALID_ARGUMENT",
            "version should be an integral value > 0",
        ),
        (
            lambda c: c.get_model_repository_index() and c.load_model("simple"),
            "UNAVAILABLE",
            "explicit model load / unload is not allowed if polling is enabled",
        ),
        (
            lambda c: c.get_inference_statistics("no_such_model"),
            "INVALID_ARGUMENT",
            "requested model 'no_such_model' is not available",
        ),
    ],
)
def test_error_codes_and_texts(
    client: grpcclient.InferenceServerClient, call, code: str, message: str
) -> None:  # noqa: ANN001
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == f"StatusCode.{code}"
    assert message in info.value.message()


def test_infer_outputs_subset_and_request_id(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "simple", simple_inputs(), request_id="req-7", outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
    )
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.arange(16).reshape(1, 16) - 1)
    assert result.as_numpy("OUTPUT0") is None


def test_batched_request(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("simple", simple_inputs(batch=3))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(48).reshape(3, 16) + 1)


def test_custom_parameters_priority_and_timeout_accepted(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "simple",
        simple_inputs(),
        priority=1,
        timeout=10_000_000,
        parameters={"k": "v", "n": 3, "f": 0.5, "b": True},
    )
    assert result.as_numpy("OUTPUT0") is not None


def test_reserved_parameter_rejected(url: str) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="simple")
        request.parameters["triton_secret"].bool_param = True
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved for Triton usage" in info.value.details()


def test_decoupled_model_rejects_unary(client: grpcclient.InferenceServerClient) -> None:
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(
        InferenceServerException, match="doesn't support models with decoupled transaction policy"
    ):
        client.infer("repeat_int32", [tensor])


def test_statistics_count_requests(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple").model_stats[0]
    client.infer("simple", simple_inputs(batch=2))
    after = statistics_after_execution(client, "simple", before.execution_count + 1)
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2
    assert after.execution_count >= before.execution_count + 1
    assert after.last_inference > 0
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, field).count == after.inference_stats.success.count
        assert getattr(after.inference_stats, field).ns > 0
    assert any(b.batch_size == 2 for b in after.batch_stats)


def test_failures_are_counted(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple").model_stats[0].inference_stats.fail.count
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(
        InferenceServerException, match="data-type is 'FP32', but model 'simple' expects 'INT32'"
    ):
        client.infer("simple", [bad, simple_inputs()[1]])
    assert client.get_inference_statistics("simple").model_stats[0].inference_stats.fail.count == before + 1


def test_repository_index_lists_models(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    by_name = {m.name: m for m in index.models}
    for model in STOCK_MODELS:
        assert by_name[model].state == "READY"
    assert "llama3" in by_name and by_name["llama3"].state == ""


def test_stream_keeps_order_and_marks_final(url: str) -> None:
    responses: list[tuple[object, object]] = []
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        for i in range(20):
            client.async_stream_infer("simple", simple_inputs(), request_id=str(i))
        client.stop_stream()
    assert [r.get_response().id for r, _ in responses] == [str(i) for i in range(20)]
    for result, error in responses:
        assert error is None
        assert result.get_response().parameters["triton_final_response"].bool_param


def test_stream_errors_are_in_band_and_stream_continues(url: str) -> None:
    responses: list[tuple[object, object]] = []
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        client.async_stream_infer("vllm_opt", simple_inputs(), request_id="a")
        client.async_stream_infer("simple", simple_inputs(), request_id="b")
        client.stop_stream()
    errors = [e for _, e in responses if e is not None]
    assert [str(e) for e in errors] == ["Request for unknown model: 'vllm_opt' is not found"]
    assert [r.get_response().id for r, e in responses if e is None] == ["b"]


def test_grpc_health_service(url: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_reflection_lists_services(url: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_classification_output(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "simple", simple_inputs(batch=2), outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    )
    classes = result.as_numpy("OUTPUT0")
    assert classes.shape == (2, 3)
    assert classes[0].tolist() == [b"16:15", b"15:14", b"14:13"]
    assert classes[1].tolist() == [b"32:15", b"31:14", b"30:13"]
