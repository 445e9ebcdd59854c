"""System shared memory through the stock tritonclient: the RPCs, inference with inputs and outputs in
client regions (unary, streaming, BYTES), Triton's error texts, deferred unregister, and the switch; and
what a client cannot do to the server through its regions (truncate or replace them, exhaust fds)."""

from __future__ import annotations

import base64
import os
import queue
import re
import resource
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from pagedserve.shared_memory import DEFAULT_MAX_REGIONS
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from .conftest import ServerProcess, start_server


@pytest.fixture(scope="module")
def shm_server() -> Iterator[ServerProcess]:
    process = start_server(
        "model=[simple,simple_identity,repeat_int32,identity_fp32]", "server.allow_client_shm=true"
    )
    yield process
    process.stop()


@pytest.fixture
def shm_client(shm_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with shm_server.client() as client:
        yield client
        client.unregister_system_shared_memory()


class Regions:
    """Client-side regions with keys unique to this test, destroyed afterwards."""

    def __init__(self) -> None:
        self.tag = f"ps{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.handles: dict[str, object] = {}

    def key(self, name: str) -> str:
        return f"/{self.tag}_{name}"

    def create(self, name: str, byte_size: int, *arrays: np.ndarray) -> object:
        handle = shm.create_shared_memory_region(name, self.key(name), byte_size)
        if arrays:
            shm.set_shared_memory_region(handle, list(arrays))
        self.handles[name] = handle
        return handle

    def destroy(self) -> None:
        for handle in self.handles.values():
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    yield made
    made.destroy()


INPUT0 = np.arange(16, dtype=np.int32).reshape(1, 16)
INPUT1 = np.ones((1, 16), dtype=np.int32)


def _simple_setup(client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    """Triton's example layout: both inputs in one 128-byte region, both outputs in another."""
    regions.create("input_data", 128, INPUT0, INPUT1)
    regions.create("output_data", 128)
    client.register_system_shared_memory("input_data", regions.key("input_data"), 128)
    client.register_system_shared_memory("output_data", regions.key("output_data"), 128)


def _shm_inputs(input1_region: tuple[str, int, int] = ("input_data", 64, 64)) -> list[grpcclient.InferInput]:
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_shared_memory("input_data", 64)
    name, byte_size, offset = input1_region
    inputs[1].set_shared_memory(name, byte_size, offset=offset)
    return inputs


def _shm_outputs(byte_size: int = 64, offset: int = 0) -> list[grpcclient.InferRequestedOutput]:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("output_data", byte_size, offset=offset)
    outputs[1].set_shared_memory("output_data", 64, offset=64)
    return outputs


def _read_outputs(regions: Regions) -> tuple[np.ndarray, np.ndarray]:
    handle = regions.handles["output_data"]
    return (
        shm.get_contents_as_numpy(handle, np.int32, [1, 16]),
        shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=64),
    )


# -- registration RPCs -------------------------------------------------------------------------------


def test_register_status_unregister(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    regions.create("a", 64)
    regions.create("b", 128)
    shm_client.unregister_system_shared_memory("a")  # before registering: fine
    shm_client.register_system_shared_memory("a", regions.key("a"), 64)
    shm_client.register_system_shared_memory("b", regions.key("b"), 64, offset=32)
    status = shm_client.get_system_shared_memory_status().regions
    assert set(status) == {"a", "b"}
    b = status["b"]
    assert (b.name, b.key, b.offset, b.byte_size) == ("b", regions.key("b"), 32, 64)
    assert set(shm_client.get_system_shared_memory_status("a").regions) == {"a"}

    shm_client.unregister_system_shared_memory("a")
    assert set(shm_client.get_system_shared_memory_status().regions) == {"b"}
    shm_client.unregister_system_shared_memory("never-registered")
    shm_client.unregister_system_shared_memory()
    assert not shm_client.get_system_shared_memory_status().regions
    assert os.path.exists("/dev/shm/" + regions.key("a").lstrip("/")), "the server must never unlink"


def _expect(call, code: str, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}"
    assert message in info.value.message(), info.value.message()


def test_register_errors(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    regions.create("dummy_data", 64)
    key = regions.key("dummy_data")
    shm_client.register_system_shared_memory("dummy_data", key, 64)
    _expect(
        lambda: shm_client.register_system_shared_memory("dummy_data", key, 64),
        "ALREADY_EXISTS",
        "shared memory region 'dummy_data' already in manager",
    )
    missing = f"/{regions.tag}_missing"
    _expect(
        lambda: shm_client.register_system_shared_memory("x", missing, 8),
        "INTERNAL",
        f"Unable to open shared memory region: '{missing}'",
    )
    _expect(
        lambda: shm_client.register_system_shared_memory("x", "///", 8),
        "INVALID_ARGUMENT",
        "cannot register shared memory region 'x' - invalid shm key '///'",
    )
    reserved = "triton_python_backend_shm_region_"
    _expect(
        lambda: shm_client.register_system_shared_memory("x", f"/{reserved}_mine", 8),
        "INVALID_ARGUMENT",
        f"cannot register shared memory region 'x' with key '/{reserved}_mine' as the key contains the "
        f"reserved prefix '{reserved}'",
    )
    for traversal in ("/../etc/passwd", "/a/../../etc/hosts", "/.."):
        _expect(
            lambda k=traversal: shm_client.register_system_shared_memory("x", k, 8),
            "INTERNAL",
            f"Unable to open shared memory region: '{traversal}'",
        )
    _expect(
        lambda: shm_client.get_system_shared_memory_status("x"),
        "NOT_FOUND",
        "Unable to find system shared memory region: 'x'",
    )
    assert set(shm_client.get_system_shared_memory_status().regions) == {"dummy_data"}


@pytest.mark.parametrize(("byte_size", "offset"), [(65, 0), (64, 1), (1, 64), (0, 65)])
def test_register_out_of_bounds(
    shm_client: grpcclient.InferenceServerClient, regions: Regions, byte_size: int, offset: int
) -> None:
    regions.create("r", 64)
    with pytest.raises(
        InferenceServerException, match="failed to register shared memory region.*invalid args"
    ):
        shm_client.register_system_shared_memory("r", regions.key("r"), byte_size, offset=offset)


# -- inference -----------------------------------------------------------------------------------


def test_infer_inputs_and_outputs_in_shm(
    shm_client: grpcclient.InferenceServerClient, regions: Regions
) -> None:
    _simple_setup(shm_client, regions)
    result = shm_client.infer("simple", _shm_inputs(), outputs=_shm_outputs())
    response = result.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "INT32", [1, 16]),
        ("OUTPUT1", "INT32", [1, 16]),
    ]
    assert list(response.raw_output_contents) == [b"", b""]
    out0, out1 = _read_outputs(regions)
    np.testing.assert_array_equal(out0, INPUT0 + INPUT1)
    np.testing.assert_array_equal(out1, INPUT0 - INPUT1)


def test_infer_mixed_raw_and_shm(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    _simple_setup(shm_client, regions)
    inputs = _shm_inputs()
    inputs[1] = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    inputs[1].set_data_from_numpy(INPUT1 * 5)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("output_data", 64)
    result = shm_client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(_read_outputs(regions)[0], INPUT0 + 5)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), INPUT0 - 5)  # this one came back raw


def test_stream_infer_with_shm(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    _simple_setup(shm_client, regions)
    results: queue.Queue = queue.Queue()
    shm_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        shm_client.async_stream_infer("simple", _shm_inputs(), outputs=_shm_outputs(), request_id="s1")
        result, error = results.get(timeout=30)
    finally:
        shm_client.stop_stream()
    assert error is None, error
    assert result.get_response().id == "s1"
    out0, out1 = _read_outputs(regions)
    np.testing.assert_array_equal(out0, INPUT0 + INPUT1)
    np.testing.assert_array_equal(out1, INPUT0 - INPUT1)


def test_bytes_tensor_in_shm(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    data = np.array([[b"hello", b"\x00binary\xff", b""]], dtype=np.object_)
    serialized = serialize_byte_tensor(data)
    size = len(serialized.item())  # a 0-d object array holding the serialized bytes
    regions.create("bytes_in", size, serialized)
    regions.create("bytes_out", size)
    shm_client.register_system_shared_memory("bytes_in", regions.key("bytes_in"), size)
    shm_client.register_system_shared_memory("bytes_out", regions.key("bytes_out"), size)
    tensor = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    tensor.set_shared_memory("bytes_in", size)
    output = grpcclient.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory("bytes_out", size)
    shm_client.infer("simple_identity", [tensor], outputs=[output])
    echoed = shm.get_contents_as_numpy(regions.handles["bytes_out"], np.object_, [1, 3])
    assert echoed.tolist() == data.tolist()


def test_infer_errors(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    _simple_setup(shm_client, regions)
    regions.create("big", 128)
    shm_client.register_system_shared_memory("big", regions.key("big"), 128)
    cases = [
        (
            {"inputs": _shm_inputs(("big", 128, 0))},
            "INVALID_ARGUMENT",
            "input byte size mismatch for input 'INPUT1' for model 'simple'. Expected 64, got 128",
        ),
        (
            {"outputs": _shm_outputs(offset=128)},
            "INVALID_ARGUMENT",
            "Invalid offset for shared memory region: 'output_data'",
        ),
        (
            {"outputs": _shm_outputs(offset=100)},
            "INVALID_ARGUMENT",
            "Invalid offset + byte size for shared memory region: 'output_data'",
        ),
        (
            {"inputs": _shm_inputs(("nowhere", 64, 0))},
            "NOT_FOUND",
            "Unable to find shared memory region: 'nowhere'",
        ),
        (
            {"outputs": _shm_outputs(byte_size=32)},
            "INVALID_ARGUMENT",  # Triton says INTERNAL, but the client chose the size
            "shared memory size specified with the request for output 'OUTPUT0' (32 bytes) should be at "
            "least 64 bytes to hold the results",
        ),
    ]
    for kwargs, code, message in cases:
        inputs = kwargs.get("inputs", _shm_inputs())
        outputs = kwargs.get("outputs", _shm_outputs())
        _expect(lambda i=inputs, o=outputs: shm_client.infer("simple", i, outputs=o), code, message)
    # every failed request released its regions: unregistering removes them at once
    shm_client.unregister_system_shared_memory()
    assert not shm_client.get_system_shared_memory_status().regions


def _raw_request(**output_params: object) -> object:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="simple")
    for name, data in (("INPUT0", INPUT0), ("INPUT1", INPUT1)):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(data.tobytes())
    output = request.outputs.add(name="OUTPUT0")
    for key, value in output_params.items():
        param = output.parameters[key]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, bool):
            param.bool_param = value
        else:
            param.int64_param = value
    return request


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"shared_memory_region": "output_data", "shared_memory_byte_size": 64, "classification": 2},
            "output can't set both 'shared_memory_region' and 'classification'",
        ),
        (
            {"shared_memory_offset": 4},
            "'shared_memory_offset' can not be specified without 'shared_memory_region' parameter for "
            "tensor 'OUTPUT0'",
        ),
        (
            {"shared_memory_region": "output_data"},
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for "
            "tensor 'OUTPUT0'",
        ),
        (
            {"shared_memory_region": "output_data", "shared_memory_byte_size": True},
            "invalid value type for 'shared_memory_byte_size' parameter for tensor 'OUTPUT0', expected "
            "int64_param.",
        ),
    ],
    ids=["classification", "offset-alone", "no-byte-size", "byte-size-type"],
)
def test_output_parameter_errors(shm_server: ServerProcess, params: dict, message: str) -> None:
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(shm_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_raw_request(**params))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_unregister_while_in_use_is_deferred(
    shm_client: grpcclient.InferenceServerClient, shm_server: ServerProcess, regions: Regions
) -> None:
    regions.create("slow_in", 4, np.array([7], dtype=np.int32))
    shm_client.register_system_shared_memory("slow_in", regions.key("slow_in"), 4)
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_shared_memory("slow_in", 4)
    delay = grpcclient.InferInput("DELAY", [1], "UINT32")
    delay.set_data_from_numpy(np.array([1500], dtype=np.uint32))
    wait = grpcclient.InferInput("WAIT", [1], "UINT32")
    wait.set_data_from_numpy(np.array([0], dtype=np.uint32))
    results: queue.Queue = queue.Queue()
    shm_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        shm_client.async_stream_infer("repeat_int32", [tensor, delay, wait])
        time.sleep(0.5)  # the model is now waiting, holding the region
        with shm_server.client() as other:
            other.unregister_system_shared_memory()
            assert set(other.get_system_shared_memory_status().regions) == {"slow_in"}
        result, error = results.get(timeout=30)
    finally:
        shm_client.stop_stream()
    assert error is None, error
    assert result.as_numpy("OUT").tolist() == [7]
    deadline = time.monotonic() + 10
    while shm_client.get_system_shared_memory_status().regions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not shm_client.get_system_shared_memory_status().regions


# -- what a client cannot do to the server through its regions -----------------------------------

FLOATS = np.arange(2048, dtype=np.float32).reshape(1, 2048)  # 8 KB


def _resize(key: str, byte_size: int) -> None:
    """What another process of the client may do at any time: change the object's size under us."""
    fd = os.open("/dev/shm/" + key.lstrip("/"), os.O_RDWR)
    try:
        os.ftruncate(fd, byte_size)
    finally:
        os.close(fd)


def _identity_input(region: str | None = None) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [1, 2048], "FP32")
    if region is None:
        tensor.set_data_from_numpy(FLOATS)
    else:
        tensor.set_shared_memory(region, FLOATS.nbytes)
    return tensor


def _assert_still_serving(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.output
    with server.client() as fresh:
        echoed = fresh.infer("identity_fp32", [_identity_input()]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(echoed, FLOATS)


def test_truncated_input_region_fails_only_its_request(
    shm_client: grpcclient.InferenceServerClient, shm_server: ServerProcess, regions: Regions
) -> None:
    regions.create("victim", FLOATS.nbytes, FLOATS)
    shm_client.register_system_shared_memory("victim", regions.key("victim"), FLOATS.nbytes)
    for size in (0, FLOATS.nbytes // 2):  # nothing left, and a short read
        _resize(regions.key("victim"), size)
        _expect(
            lambda: shm_client.infer("identity_fp32", [_identity_input("victim")]),
            "INVALID_ARGUMENT",
            f"shared memory region 'victim' was truncated after it was registered: key "
            f"'{regions.key('victim')}' is smaller than its registered offset + byte size (8192 bytes)",
        )
        _assert_still_serving(shm_server)
    _resize(regions.key("victim"), FLOATS.nbytes)  # restored by the client: usable again
    shm.set_shared_memory_region(regions.handles["victim"], [FLOATS * 3])
    echoed = shm_client.infer("identity_fp32", [_identity_input("victim")]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(echoed, FLOATS * 3)


def test_truncated_output_region_fails_only_its_request(
    shm_client: grpcclient.InferenceServerClient, shm_server: ServerProcess, regions: Regions
) -> None:
    regions.create("out", FLOATS.nbytes)
    shm_client.register_system_shared_memory("out", regions.key("out"), FLOATS.nbytes)
    _resize(regions.key("out"), 4096)
    output = grpcclient.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory("out", FLOATS.nbytes)
    _expect(
        lambda: shm_client.infer("identity_fp32", [_identity_input()], outputs=[output]),
        "INVALID_ARGUMENT",
        "shared memory region 'out' was truncated after it was registered",
    )
    assert os.stat("/dev/shm/" + regions.key("out").lstrip("/")).st_size == 4096, "must not grow it"
    _assert_still_serving(shm_server)


def test_replaced_object_is_not_read(
    shm_client: grpcclient.InferenceServerClient, shm_server: ServerProcess, regions: Regions
) -> None:
    """A new object under a registered key is not the registered region (Triton would keep reading
    the old, unlinked one); the client must register again."""
    regions.create("swap", FLOATS.nbytes, FLOATS)
    shm_client.register_system_shared_memory("swap", regions.key("swap"), FLOATS.nbytes)
    shm.destroy_shared_memory_region(regions.handles.pop("swap"))
    regions.create("swap", FLOATS.nbytes, FLOATS * 2)
    _expect(
        lambda: shm_client.infer("identity_fp32", [_identity_input("swap")]),
        "INVALID_ARGUMENT",
        f"shared memory region 'swap' is no longer available: the object with key '{regions.key('swap')}' "
        "was removed or replaced after it was registered",
    )
    shm_client.unregister_system_shared_memory("swap")
    shm_client.register_system_shared_memory("swap", regions.key("swap"), FLOATS.nbytes)
    echoed = shm_client.infer("identity_fp32", [_identity_input("swap")]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(echoed, FLOATS * 2)


def test_registrations_hold_no_descriptors_and_are_bounded(regions: Regions) -> None:
    """Thousands of registrations under a low fd limit: none costs a descriptor, the count is bounded
    with RESOURCE_EXHAUSTED, and new connections, inference and /metrics keep working."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))  # the server inherits it
    try:
        server = start_server("model=[simple]", "server.allow_client_shm=true", "server.metrics_port=0")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        regions.create("many", 128, INPUT0, INPUT1)
        key = regions.key("many")
        with server.client() as client:
            for i in range(DEFAULT_MAX_REGIONS):
                client.register_system_shared_memory(f"r{i}", key, 128)
            _expect(
                lambda: client.register_system_shared_memory("one_more", key, 128),
                "RESOURCE_EXHAUSTED",
                f"failed to register shared memory region 'one_more': the server already holds the maximum "
                f"of {DEFAULT_MAX_REGIONS} registered shared memory regions; unregister some first",
            )
            client.unregister_system_shared_memory("r0")
            client.register_system_shared_memory("one_more", key, 128)
            assert len(client.get_system_shared_memory_status().regions) == DEFAULT_MAX_REGIONS
        with server.client() as fresh:
            inputs = _shm_inputs(("one_more", 64, 64))
            inputs[0].set_shared_memory("r1", 64)
            result = fresh.infer("simple", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT0 + INPUT1)
            fresh.unregister_system_shared_memory()
        port = re.search(r"metrics listening on [^:]+:(\d+)", server.output).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()


# -- switched off, and CUDA on a machine without it ----------------------------------------------


def test_client_shm_disabled_by_default(client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    regions.create("off", 64)
    disabled = "Client shared memory is disabled"
    _expect(
        lambda: client.register_system_shared_memory("off", regions.key("off"), 64), "UNIMPLEMENTED", disabled
    )
    _expect(lambda: client.unregister_system_shared_memory(), "UNIMPLEMENTED", disabled)
    _expect(lambda: client.register_cuda_shared_memory("off", b"", 0, 64), "UNIMPLEMENTED", disabled)
    _expect(lambda: client.unregister_cuda_shared_memory(), "UNIMPLEMENTED", disabled)
    assert not client.get_system_shared_memory_status().regions
    assert not client.get_cuda_shared_memory_status().regions
    inputs = _shm_inputs()
    _expect(lambda: client.infer("simple", inputs), "UNIMPLEMENTED", disabled)


def test_cuda_rpcs_without_a_gpu(shm_client: grpcclient.InferenceServerClient, regions: Regions) -> None:
    with pytest.raises(
        InferenceServerException, match="failed to register shared memory region.*invalid args"
    ):
        shm_client.register_cuda_shared_memory("", b"", 0, 0)
    assert not shm_client.get_cuda_shared_memory_status().regions
    _expect(
        lambda: shm_client.get_cuda_shared_memory_status("nope"),
        "NOT_FOUND",
        "Unable to find cuda shared memory region: 'nope'",
    )
    regions.create("sys", 64)
    shm_client.register_system_shared_memory("sys", regions.key("sys"), 64)
    _expect(
        lambda: shm_client.get_cuda_shared_memory_status("sys"),
        "NOT_FOUND",
        "The region named 'sys' is registered as system shared memory, not CUDA shared memory",
    )
    shm_client.unregister_cuda_shared_memory("sys")  # a system region: CUDA unregister leaves it
    assert set(shm_client.get_system_shared_memory_status().regions) == {"sys"}
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        fake_handle = base64.b64encode(bytes(64))
        _expect(
            lambda: shm_client.register_cuda_shared_memory("gpu", fake_handle, 0, 64),
            "INVALID_ARGUMENT",
            "failed to register CUDA shared memory region: 'gpu', GPUs not supported",
        )
