"""The ``http`` front-end through the stock ``tritonclient.http`` (sync and aio): every endpoint."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server, statistics_after_execution


@pytest.fixture(scope="module")
def http_server() -> Iterator[ServerProcess]:
    server = start_server(
        "frontends=[grpc,http]",
        "model_control_mode=explicit",
        "model=[simple,simple_string,simple_identity,repeat_int32,identity_fp32]",
        "server.allow_client_shm=true",
    )
    yield server
    server.stop()


@pytest.fixture
def client(http_server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(http_server.http_url) as c:
        yield c


def simple_inputs(binary: bool = True) -> list[httpclient.InferInput]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    return inputs


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("simple", "7")
    server = client.get_server_metadata()
    assert server["name"] == "triton" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("simple")
    assert meta["name"] == "simple" and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert client.get_model_metadata("simple", "1")["outputs"][1]["name"] == "OUTPUT1"
    config = client.get_model_config("simple")
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [16]  # numbers, as Triton's


def test_unknown_model_and_version(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="unknown model: 'nope' is not found") as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "404"
    with pytest.raises(InferenceServerException, match="version 9 is not found"):
        client.get_model_config("simple", "9")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_json_and_binary(client: httpclient.InferenceServerClient, binary: bool) -> None:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("simple", simple_inputs(binary), outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(1, 17, dtype=np.int32).reshape(1, 16))
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT1"), np.arange(-1, 15, dtype=np.int32).reshape(1, 16)
    )
    # No outputs listed: the client asks binary_data_output, every output comes back binary.
    default = client.infer("simple", simple_inputs(binary))
    assert all("binary_data_size" in o["parameters"] for o in default.get_response()["outputs"])


def test_infer_bytes_and_compression(client: httpclient.InferenceServerClient) -> None:
    data = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "BYTES"),
        httpclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(data)
    inputs[1].set_data_from_numpy(data, binary_data=False)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "simple_string",
            inputs,
            outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        assert [int(x) for x in result.as_numpy("OUTPUT0").reshape(-1)] == [2 * i for i in range(16)]
    raw = np.array([b"\x00\xffbinary", b""], dtype=np.object_)
    identity = httpclient.InferInput("INPUT0", [1, 2], "BYTES")
    identity.set_data_from_numpy(raw.reshape(1, 2))
    out = client.infer("simple_identity", [identity]).as_numpy("OUTPUT0")
    assert out.reshape(-1).tolist() == raw.tolist()


def test_infer_parameters_and_classification(client: httpclient.InferenceServerClient) -> None:
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=False, class_count=3)]
    result = client.infer("simple", simple_inputs(), outputs=outputs, parameters={"custom": 5, "flag": True})
    top = result.as_numpy("OUTPUT0")
    assert top.shape == (1, 3) and top[0, 0] in (b"16:15", "16:15")
    with pytest.raises(InferenceServerException, match="reserved"):
        client.infer("simple", simple_inputs(), parameters={"triton_x": 1})


def test_decoupled_model_refused_on_infer(client: httpclient.InferenceServerClient) -> None:
    inputs = [
        httpclient.InferInput(n, [1], t)
        for n, t in (("IN", "INT32"), ("DELAY", "UINT32"), ("WAIT", "UINT32"))
    ]
    values = (np.array([1], np.int32), np.array([0], np.uint32), np.array([0], np.uint32))
    for tensor, value in zip(inputs, values, strict=True):
        tensor.set_data_from_numpy(value)
    with pytest.raises(InferenceServerException, match="doesn't support models with decoupled") as error:
        client.infer("repeat_int32", inputs)
    assert error.value.status() == "501"


def test_statistics_count_http_like_grpc(
    http_server: ServerProcess, client: httpclient.InferenceServerClient
) -> None:
    with http_server.client() as grpc_client:
        before = grpc_client.get_inference_statistics("identity_fp32").model_stats[0].inference_count
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("identity_fp32", [tensor])
        grpc_tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        grpc_tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        grpc_client.infer("identity_fp32", [grpc_tensor])
        stats = statistics_after_execution(grpc_client, "identity_fp32", 0)
        assert stats.inference_count == before + 2
    http_stats = client.get_inference_statistics("identity_fp32")["model_stats"][0]
    assert http_stats["inference_count"] == before + 2
    assert http_stats["inference_stats"]["success"]["count"] == before + 2
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} >= {
        "simple",
        "identity_fp32",
    }


def test_repository_load_unload(client: httpclient.InferenceServerClient) -> None:
    assert {"name": "simple", "version": "1", "state": "READY"} in client.get_model_repository_index()
    client.load_model("simple_int8")
    assert client.is_model_ready("simple_int8")
    override = json.dumps({"max_batch_size": 4})
    client.load_model("simple_int8", config=override)
    assert client.get_model_config("simple_int8")["max_batch_size"] == 4
    client.unload_model("simple_int8", unload_dependents=True)
    assert not client.is_model_ready("simple_int8")
    with pytest.raises(InferenceServerException, match="failed to load 'nope'"):
        client.load_model("nope")


def test_system_shared_memory(client: httpclient.InferenceServerClient) -> None:
    key = f"/pagedserve_http_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("in_out", key, 256)
    try:
        shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.int32), np.ones(16, dtype=np.int32)])
        client.register_system_shared_memory("in_out", key, 256)
        status = client.get_system_shared_memory_status()
        assert status == [{"name": "in_out", "key": key, "offset": 0, "byte_size": 256}]
        assert client.get_system_shared_memory_status("in_out")[0]["name"] == "in_out"
        inputs = [
            httpclient.InferInput("INPUT0", [1, 16], "INT32"),
            httpclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_shared_memory("in_out", 64)
        inputs[1].set_shared_memory("in_out", 64, offset=64)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("in_out", 64, offset=128)
        outputs[1].set_shared_memory("in_out", 64, offset=192)
        result = client.infer("simple", inputs, outputs=outputs)
        output = result.get_output("OUTPUT0")  # as Triton: name, datatype, shape; the data is in the region
        assert output == {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16]}
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(handle, np.int32, [16], offset=128), np.arange(1, 17)
        )
        with pytest.raises(InferenceServerException, match="already in manager"):
            client.register_system_shared_memory("in_out", key, 256)
        with pytest.raises(InferenceServerException, match="Unable to find system shared memory region"):
            client.get_system_shared_memory_status("nope")
        client.unregister_system_shared_memory("in_out")
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(handle)


def test_cuda_shared_memory_endpoints(client: httpclient.InferenceServerClient) -> None:
    assert client.get_cuda_shared_memory_status() == []
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("nope")
    with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory region: 'nope'"):
        client.get_cuda_shared_memory_status("nope")


def test_trace_and_log_settings(client: httpclient.InferenceServerClient) -> None:
    settings = client.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_rate"] == "1000"
    updated = client.update_trace_settings(model_name="simple", settings={"trace_rate": "7"})
    assert updated["trace_rate"] == "7"
    assert client.get_trace_settings()["trace_rate"] == "1000"  # global unchanged
    assert (
        client.update_trace_settings(model_name="simple", settings={"trace_rate": None})["trace_rate"]
        == "1000"
    )
    with pytest.raises(InferenceServerException, match="trace file location"):
        client.update_trace_settings(settings={"trace_file": "/tmp/x"})
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_trace_settings(model_name="nope")
    logs = client.get_log_settings()
    assert logs["log_info"] is True and logs["log_verbose_level"] == 0
    assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert client.update_log_settings({"log_verbose_level": 0, "log_info": True})["log_verbose_level"] == 0
    with pytest.raises(InferenceServerException, match="expect boolean for 'log_info'"):
        client.update_log_settings({"log_info": "yes"})


def test_aio_client(http_server: ServerProcess) -> None:
    async def run() -> None:
        async with aioclient.InferenceServerClient(http_server.http_url) as client:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("simple"))["name"] == "simple"
            inputs = [
                aioclient.InferInput("INPUT0", [1, 16], "INT32"),
                aioclient.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            inputs[0].set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
            inputs[1].set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
            results = await asyncio.gather(*(client.infer("simple", inputs) for _ in range(8)))
            for result in results:
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0")[0], np.arange(1, 17))
            stats = await client.get_inference_statistics("simple")
            assert stats["model_stats"][0]["inference_count"] >= 8
            with pytest.raises(InferenceServerException, match="unknown model: 'nope'"):
                await client.get_model_config("nope")

    asyncio.run(run())


def test_restricted_apis() -> None:
    server = start_server(
        "frontends=[grpc,http]",
        "model=[simple]",
        "server.restricted_protocols=[{protocols:[inference,model-repository],key:admin-key,value:s3cret}]",
    )
    try:
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert client.is_server_ready()  # health is not restricted
            with pytest.raises(
                InferenceServerException, match="This API is restricted, expecting header 'admin-key'"
            ) as error:  # noqa: E501
                client.infer("simple", simple_inputs())
            assert error.value.status() == "403"
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_repository_index(headers={"admin-key": "wrong"})
            result = client.infer("simple", simple_inputs(), headers={"admin-key": "s3cret"})
            assert result.as_numpy("OUTPUT0")[0, 0] == 1
    finally:
        server.stop()
