"""Network posture, black-box through the stock tritonclient: restricted protocol groups (Triton's
``--grpc-restricted-protocol``), TLS and mutual TLS on gRPC and /metrics, malformed messages answered
INVALID_ARGUMENT (in-band on a stream), and SIGTERM draining."""

from __future__ import annotations

import contextlib
import http.client
import queue
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server

ADMIN = ("triton-grpc-protocol-admin-key", "s3cret")


def simple_inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.arange(16, dtype=np.int32)[None])
        inputs.append(tensor)
    return inputs


def start_repeat(client: grpcclient.InferenceServerClient, delays_ms: list[int]) -> queue.Queue:
    """Stream one repeat_int32 request that answers ``i`` after ``delays_ms[i]``; returns the queue of
    ``(result, error)`` pairs once the first answer is in (the request is running)."""
    arrays = {
        "IN": np.arange(1, len(delays_ms) + 1, dtype=np.int32),
        "DELAY": np.array(delays_ms, np.uint32),
        "WAIT": np.array([0], np.uint32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT32" if name == "IN" else "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("repeat_int32", inputs)
    result, error = answers.get(timeout=60)
    assert error is None, error
    return answers


# -- restricted protocols ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restricted() -> ServerProcess:
    server = start_server(
        "model=simple",
        "model_control_mode=explicit",
        "server.restricted_protocols=[{protocols:[model-repository,logging,trace,shared-memory],"
        "key:admin-key,value:s3cret}]",
    )
    yield server
    server.stop()


def test_restricted_groups_need_their_header(restricted: ServerProcess) -> None:
    with restricted.client() as client:
        for call in (
            lambda **kw: client.get_model_repository_index(**kw),
            lambda **kw: client.load_model("simple", **kw),
            lambda **kw: client.get_log_settings(**kw),
            lambda **kw: client.update_log_settings({"log_error": False}, **kw),
            lambda **kw: client.get_trace_settings(**kw),
            lambda **kw: client.get_system_shared_memory_status(**kw),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'" in str(
                info.value
            )
            with pytest.raises(InferenceServerException, match="restricted"):
                call(headers={ADMIN[0]: "wrong"})
            call(headers=dict([ADMIN]))
        # the groups nobody restricted stay open
        assert client.is_server_ready()
        assert client.infer("simple", simple_inputs()).as_numpy("OUTPUT0") is not None
        assert client.get_model_metadata("simple").name == "simple"


def test_restricted_health_covers_grpc_health_and_streams() -> None:
    server = start_server(
        "model=simple",
        "server.restricted_protocols=[{protocols:[health,inference],key:k,value:v}]",
        wait_ready=False,
    )
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stub.Check(health_pb2.HealthCheckRequest(), metadata=[("triton-grpc-protocol-k", "v")])
        with server.client() as client:
            errors: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: errors.put(error))
            # The refusal ends the stream as it opens: it may come before this request is sent, and
            # then sending on the ended stream raises too.
            with contextlib.suppress(InferenceServerException):
                client.async_stream_infer("simple", simple_inputs())
            error = errors.get(timeout=30)
            assert error is not None and "restricted" in str(error)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{protocols:[admin],key:k,value:v}]", "unknown restricted protocol 'admin'"),
        (
            "[{protocols:[trace],key:k,value:v},{protocols:[trace],key:j,value:w}]",
            "restricted protocol 'trace' can not be specified in multiple config groups",
        ),
        ("[{protocols:[trace],key:'',value:v}]", "key must be non-empty"),
        ("[{protocols:[trace],key:K Y,value:v}]", "key must be non-empty lowercase"),
        ("[{protocols:[trace],key:k,value:''}]", "value must not be empty"),
        ("[{protocols:[],key:k,value:v}]", "must name at least one"),
    ],
)
def test_bad_restrictions_are_configuration_errors(value: str, message: str) -> None:
    result = subprocess.run(
        ["serve", f"server.restricted_protocols={value}", "check=true", "model=simple"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "server.restricted_protocols" in result.stderr


# -- TLS ----------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)  # fmt: skip


def _make_cert(directory: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=directory)  # fmt: skip
    extra = []
    if san:
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    _make_ca(directory, "ca")
    _make_ca(directory, "rogue-ca")
    _make_cert(directory, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    _make_cert(directory, "client", "ca")
    _make_cert(directory, "rogue", "rogue-ca")
    return directory


def _tls_client(server: ServerProcess, certs: Path, client: str | None) -> grpcclient.InferenceServerClient:
    files = {}
    if client:
        files = {
            "private_key": str(certs / f"{client}.key"),
            "certificate_chain": str(certs / f"{client}.pem"),
        }
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=str(certs / "ca.pem"), **files
    )


def test_tls_serves_tls_clients_only(certs: Path) -> None:
    server = start_server(
        "model=simple",
        f"server.tls.cert={certs / 'server.pem'}",
        f"server.tls.key={certs / 'server.key'}",
        wait_ready=False,
    )
    try:
        with _tls_client(server, certs, None) as client:
            _wait_ready(client)
            assert client.infer("simple", simple_inputs()).as_numpy("OUTPUT0") is not None
        with server.client() as plain, pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        # /metrics is TLS too, with the same certificate
        port = int(server.output.split("metrics listening on 127.0.0.1:")[1].split()[0])
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=10) as page:
            assert b"nv_inference_count" in page.read()
        # so are the HTTP and OpenAI front-ends; plain HTTP gets no answer from them
        for service, path in (("HTTPService", "/v2/health/live"), ("OpenAI API", "/v1/models")):
            base = f"127.0.0.1:{server.port_of(service)}"
            with urllib.request.urlopen(f"https://{base}{path}", context=context, timeout=10) as page:
                assert page.status == 200
            with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
                urllib.request.urlopen(f"http://{base}{path}", timeout=10)
    finally:
        server.stop()


def test_mutual_tls_requires_a_certificate_from_the_root_ca(certs: Path) -> None:
    server = start_server(
        "model=simple",
        f"server.tls.cert={certs / 'server.pem'}",
        f"server.tls.key={certs / 'server.key'}",
        f"server.tls.root_ca={certs / 'ca.pem'}",
        "server.tls.require_client_cert=true",
        wait_ready=False,
    )
    try:
        with _tls_client(server, certs, "client") as client:
            _wait_ready(client)
            assert client.infer("simple", simple_inputs()).as_numpy("OUTPUT0") is not None
        for who in (None, "rogue"):
            with _tls_client(server, certs, who) as client, pytest.raises(InferenceServerException):
                client.is_server_live(client_timeout=5)
        # the HTTP front-end asks for the same client certificate
        url = f"https://127.0.0.1:{server.port_of('HTTPService')}/v2/health/live"
        for who, accepted in (("client", True), (None, False), ("rogue", False)):
            context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
            if who:
                context.load_cert_chain(str(certs / f"{who}.pem"), str(certs / f"{who}.key"))
            if accepted:
                with urllib.request.urlopen(url, context=context, timeout=10) as page:
                    assert page.status == 200
            else:
                with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                    urllib.request.urlopen(url, context=context, timeout=10).read()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["server.tls.cert=/x.pem"], "server.tls.cert and server.tls.key must be given together"),
        (["server.tls.require_client_cert=true"], "server.tls.require_client_cert needs"),
    ],
)
def test_bad_tls_settings_are_configuration_errors(args: list[str], message: str) -> None:
    result = subprocess.run(["serve", *args, "check=true"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


def _wait_ready(client: grpcclient.InferenceServerClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.is_server_ready(client_timeout=5):
                return
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)


# -- malformed messages -------------------------------------------------------------------------------


def test_unparseable_messages_are_invalid_argument(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        for rpc in ("ModelInfer", "ServerMetadata", "RepositoryModelLoad", "SystemSharedMemoryRegister"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff garbage", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert "malformed protobuf" in info.value.details()


def test_a_garbage_stream_message_gets_an_in_band_error_and_the_stream_goes_on(server: ServerProcess) -> None:
    good = grpcclient.service_pb2.ModelInferRequest(model_name="simple", id="good")
    for tensor in simple_inputs():
        good.inputs.append(tensor._get_tensor())
        good.raw_input_contents.append(tensor._get_content())
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=grpcclient.service_pb2.ModelStreamInferResponse.FromString,
        )
        responses = list(call(iter([b"\xff\xff\xff\xff garbage", good]), timeout=30))
    assert len(responses) == 2
    assert "malformed protobuf" in responses[0].error_message
    assert not responses[1].error_message and responses[1].infer_response.id == "good"


# -- drain ------------------------------------------------------------------------------------------


def test_sigterm_drains_running_requests_and_refuses_new_ones() -> None:
    server = start_server("model=[simple,repeat_int32]", "server.exit_timeout_s=60")
    with server.client() as client, grpc.insecure_channel(server.url) as channel:
        answers = start_repeat(client, [0, 1500])  # running: answers again in 1.5 s
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "shutting down" not in server.output:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not client.is_server_ready()
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", simple_inputs())
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "shutting down" in str(info.value)
        second, error = answers.get(timeout=60)  # the running request still finishes
        assert error is None and second.as_numpy("OUT").tolist() == [2]
        client.stop_stream()
    assert server.process.wait(60) == 0
    assert "Traceback" not in server.output
