"""Hostile and malformed requests to the ``http`` front-end, with plain ``http.client``: each gets
Triton's status and ``{"error": ...}`` body, never a 500 or a traceback, and the server keeps serving."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from .conftest import ServerProcess, start_server

LIMIT = 2**20


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_server(
        "frontends=[grpc,http]",
        "model=[simple,simple_string,repeat_int32,identity_fp32]",
        f"server.max_message_bytes={LIMIT}",
    )
    yield process
    process.stop()


def post(
    server: ServerProcess,
    path: str,
    body: bytes | str,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict]:
    host, port = server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(
            method, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {}
        )
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    assert response.getheader("content-type", "").startswith("application/json") or not data
    return response.status, json.loads(data) if data else {}


def simple_request(**overrides: object) -> dict:
    request = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
    request.update(overrides)
    return request


def assert_still_serving(server: ServerProcess) -> None:
    status, body = post(server, "/v2/models/simple/infer", json.dumps(simple_request()))
    assert status == 200 and body["outputs"][0]["data"] == list(range(1, 17))


def input0(**fields: object) -> dict:
    tensor = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
    tensor.update(fields)
    return tensor


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "failed to parse the request JSON"),
        ("[" * 200_000 + "]" * 200_000, 400, "failed to parse the request JSON"),
        ('"just a string"', 400, "Unable to parse 'inputs'"),
        ('{"inputs": 5}', 400, "Unable to parse 'inputs'"),
        ('{"inputs": [5]}', 400, "Unable to parse 'inputs'"),
        (json.dumps({"inputs": [input0(shape="1x16")]}), 400, "Unable to parse 'shape'"),
        (json.dumps({"inputs": [input0(shape=[1, -16])]}), 400, "Unable to parse 'shape'"),
        (json.dumps({"inputs": [input0(shape=[2**62, 2**62])]}), 400, "causes total element count to exceed"),
        (json.dumps({"inputs": [input0(shape=[2**64, 1])]}), 400, "causes total element count to exceed"),
        (json.dumps({"inputs": [input0(data=[float("nan")] * 16)]}), 400, "expected INT32 elements"),
        (json.dumps({"inputs": [input0(datatype=7)]}), 400, "Unable to parse 'datatype'"),
        (json.dumps({"inputs": [input0(data=["a"] * 16)]}), 400, "Unable to parse 'data'"),
        (json.dumps({"inputs": [input0(data=list(range(15)))]}), 400, "shape does not match true shape"),
        (json.dumps({"inputs": [input0(data=list(range(17)))]}), 400, "Shape does not match true shape"),
        (
            json.dumps({"inputs": [input0(datatype="FP16")]}),
            400,
            "receiving FP16 data via JSON is not supported",
        ),
        (json.dumps({"inputs": [input0(datatype="INT9")]}), 400, "invalid datatype for input INPUT0"),
        (
            json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1]}]}),
            400,
            "But no field is set",
        ),
        (
            json.dumps({"inputs": [input0(shape=[1, 8], data=list(range(8)))]}),
            400,
            "unexpected shape for input",
        ),
        (json.dumps(simple_request(id=5)), 400, "Unable to parse 'id'"),
        (json.dumps(simple_request(parameters={"priority": -1})), 400, "Unable to parse 'priority'"),
        (json.dumps(simple_request(parameters={"triton_x": 1})), 400, "reserved for Triton usage"),
        (json.dumps(simple_request(parameters={"x": [1]})), 400, "has invalid type"),
        (json.dumps(simple_request(outputs=[{"name": "NOPE"}])), 400, "unexpected inference output 'NOPE'"),
        (json.dumps({"inputs": [input0()]}), 400, "missing required input(s) ['INPUT1']"),
    ],
)
def test_malformed_infer_bodies(server: ServerProcess, body: str, status: int, message: str) -> None:
    got_status, got = post(server, "/v2/models/simple/infer", body)
    assert got_status == status, got
    assert message in got["error"]


def test_float_outputs_keep_nan_and_infinity(server: ServerProcess) -> None:
    """Outputs with NaN or infinity are written as Python's ``json`` writes them (``NaN``,
    ``Infinity``), which tritonclient reads back; finite ones round-trip exactly."""
    for values in ([1.5, float("nan"), float("inf"), -float("inf")], [0.1, -2.0, 1e-30, 3.4e38]):
        data = np.array(values, dtype=np.float32)
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": values}]}
        status, got = post(server, "/v2/models/identity_fp32/infer", json.dumps(body))
        assert status == 200, got
        np.testing.assert_array_equal(np.array(got["outputs"][0]["data"], dtype=np.float32), data)


def test_routes_methods_and_models(server: ServerProcess) -> None:
    assert post(server, "/v2/models/simple/infer", "", method="GET") == (405, {"error": "Method Not Allowed"})
    assert post(server, "/v2/nothing/here", "", method="GET") == (404, {"error": "Not Found"})
    assert post(server, "/v2/models/simple/versions/abc/infer", "{}")[0] == 404
    status, body = post(server, "/v2/models/nope/infer", json.dumps(simple_request()))
    assert status == 404 and body["error"] == "Request for unknown model: 'nope' is not found"
    status, body = post(server, "/v2/models/simple/versions/3/infer", json.dumps(simple_request()))
    assert status == 404 and "version 3 is not found" in body["error"]
    status, body = post(server, "/v2/models/simple/ready", "", method="GET")
    assert status == 200
    status, body = post(server, "/v2/models/nope/ready", "", method="GET")
    assert (status, body) == (400, {"error": "Model version not ready"})
    assert post(server, "/v2/repository/index", '{"ready": "yes"}')[0] == 400
    status, body = post(server, "/v2/repository/models/simple/load", "{}")
    assert status == 503 and "explicit model load / unload is not allowed" in body["error"]
    assert post(server, "/v2/systemsharedmemory/region/x/register", '{"key": "/x"}')[0] == 501  # disabled
    assert post(server, "/v2/logging", '{"log_verbose_level": -1}')[0] == 400
    assert post(server, "/v2/trace/setting", '{"trace_rate": 5}')[0] == 400
    assert_still_serving(server)


def binary_request(
    server: ServerProcess, sizes: tuple[int, int], blob: bytes, header: str | None = None
) -> tuple[int, dict]:
    document = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": s}}
                for n, s in zip(("INPUT0", "INPUT1"), sizes, strict=True)
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": header if header is not None else str(len(document))}
    return post(server, "/v2/models/simple/infer", document + blob, headers)


def test_binary_sizes_and_header_length(server: ServerProcess) -> None:
    data = np.arange(16, dtype=np.int32).tobytes() + np.ones(16, np.int32).tobytes()
    status, body = binary_request(server, (64, 64), data)
    assert status == 200 and body["outputs"][0]["data"] == list(range(1, 17))
    status, body = binary_request(server, (64, 128), data)
    assert (
        status == 400 and "unexpected size for input 'INPUT1', expecting 64 additional bytes" in body["error"]
    )
    status, body = binary_request(server, (64, 32), data)
    assert status == 400 and "unexpected additional input data for model 'simple'" in body["error"]
    status, body = binary_request(server, (60, 68), data)
    assert status == 400 and "input byte size mismatch for input 'INPUT0'" in body["error"]
    status, body = binary_request(server, (64, 64), data, header="99999")
    assert status == 400 and "inference header size should be in range" in body["error"]
    status, body = binary_request(server, (64, 64), data, header="-3")
    assert status == 400 and "inference header size should be in range" in body["error"]
    status, body = binary_request(server, (64, 64), data, header="lots")
    assert status == 400 and body["error"] == "Unable to parse Inference-Header-Content-Length, got: lots"
    status, body = binary_request(server, (64, 64), data, header="10")  # cuts the JSON short
    assert status == 400 and "failed to parse the request JSON" in body["error"]
    assert_still_serving(server)


def test_size_limits_and_compression(server: ServerProcess) -> None:
    request = json.dumps(simple_request()).encode()
    status, body = post(
        server, "/v2/models/simple/infer", gzip.compress(request), {"Content-Encoding": "gzip"}
    )
    assert status == 200
    status, body = post(
        server, "/v2/models/simple/infer", zlib.compress(request), {"Content-Encoding": "deflate"}
    )
    assert status == 200
    status, body = post(server, "/v2/models/simple/infer", request, {"Content-Encoding": "br"})
    assert (status, body) == (501, {"error": "Unsupported compression type"})
    status, body = post(server, "/v2/models/simple/infer", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "failed to decompress" in body["error"]
    bomb = gzip.compress(b"0" * (64 * LIMIT))  # 64 MiB of zeros in ~64 KiB: inflating it must stop at 1 MiB
    status, body = post(server, "/v2/models/simple/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 400 and "Decompressed data size exceeds the maximum allowed value" in body["error"]
    status, body = post(server, "/v2/models/simple/infer", b" " * (LIMIT + 1))
    assert status == 400 and "exceeds the maximum allowed input size" in body["error"]
    assert_still_serving(server)


def test_lying_content_length_and_early_close(server: ServerProcess) -> None:
    host, port = server.http_url.split(":")
    # Announces 100 MiB and sends none of it: refused from the header, without waiting for the body.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
        reply = b""
        while b"}" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"exceeds the maximum allowed input size" in reply
    # Announces 1000 bytes, sends 20 and hangs up: nothing to answer, nothing breaks.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b'POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
        )
    assert_still_serving(server)


def test_generate_bad_input(server: ServerProcess) -> None:
    status, body = post(server, "/v2/models/nope/generate", '{"text_input": "x"}')
    assert status == 404 and "unknown model: 'nope'" in body["error"]
    status, body = post(server, "/v2/models/simple/generate", "{oops")
    assert status == 400 and "failed to parse the generate JSON" in body["error"]
    status, body = post(server, "/v2/models/simple/generate", '{"INPUT0": [1, 2, 3]}')
    assert status == 400 and "can not convert input 'INPUT0' to tensor with proper shape" in body["error"]
    status, body = post(server, "/v2/models/simple/generate", '{"parameters": 5}')
    assert status == 400 and "Expected JSON object for keyword: 'parameters'" in body["error"]
    status, body = post(server, "/v2/models/simple/generate", json.dumps({"INPUT0": ["x"] * 16}))
    assert status == 400 and "Unable to parse 'data'" in body["error"]
    status, body = post(server, "/v2/models/simple/generate", "{}", {"Content-Encoding": "gzip"})
    assert (status, body) == (400, {"error": "Unsupported content-encoding, only 'identity' is supported."})
    ones = {"INPUT0": list(range(16)), "parameters": {"INPUT1": [1] * 16}}
    status, body = post(server, "/v2/models/simple/generate", json.dumps(ones))
    assert status == 200 and body["OUTPUT0"] == list(range(1, 17)) and body["model_name"] == "simple"
    assert_still_serving(server)
