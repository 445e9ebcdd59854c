"""CUDA shared memory through the stock tritonclient, client and server on one GPU machine.

The client side (``tritonclient.utils.cuda_shared_memory``) and the server side both need
``cuda-python`` (``cuda.bindings``); run with ``pytest -m gpu tests/test_cuda_shared_memory.py``.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch"
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        import tritonclient.utils.cuda_shared_memory  # noqa: F401
    except (ImportError, RuntimeError):
        return "needs cuda-python for tritonclient.utils.cuda_shared_memory"
    return None


_REASON = _skip_reason()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

import tritonclient.utils.cuda_shared_memory as cudashm  # noqa: E402

INPUT0 = np.arange(16, dtype=np.int32).reshape(1, 16)
INPUT1 = np.ones((1, 16), dtype=np.int32)


@pytest.fixture(scope="module")
def cuda_server() -> Iterator[ServerProcess]:
    process = start_server("model=[simple,repeat_int32]", "server.allow_client_shm=true")
    yield process
    process.stop()


@pytest.fixture
def cclient(cuda_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with cuda_server.client() as client:
        yield client
        client.unregister_cuda_shared_memory()
        client.unregister_system_shared_memory()


@pytest.fixture
def device_regions(cclient: grpcclient.InferenceServerClient) -> Iterator[dict[str, object]]:
    """Four 64-byte device regions (inputs filled), registered under their names."""
    handles: dict[str, object] = {}
    for name, data in (("input0", INPUT0), ("input1", INPUT1), ("output0", None), ("output1", None)):
        handle = cudashm.create_shared_memory_region(name, 64, 0)
        if data is not None:
            cudashm.set_shared_memory_region(handle, [data])
        cclient.register_cuda_shared_memory(name, cudashm.get_raw_handle(handle), 0, 64)
        handles[name] = handle
    yield handles
    cclient.unregister_cuda_shared_memory()
    for handle in handles.values():
        cudashm.destroy_shared_memory_region(handle)


def _inputs(input1: tuple[str, int] = ("input1", 64)) -> list[grpcclient.InferInput]:
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_shared_memory("input0", 64)
    inputs[1].set_shared_memory(*input1)
    return inputs


def _outputs(byte_size: int = 64, offset: int = 0) -> list[grpcclient.InferRequestedOutput]:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("output0", byte_size, offset=offset)
    outputs[1].set_shared_memory("output1", 64)
    return outputs


def _check_outputs(handles: dict[str, object]) -> None:
    np.testing.assert_array_equal(
        cudashm.get_contents_as_numpy(handles["output0"], np.int32, [1, 16]), INPUT0 + 1
    )
    np.testing.assert_array_equal(
        cudashm.get_contents_as_numpy(handles["output1"], np.int32, [1, 16]), INPUT0 - 1
    )


def test_status_and_unary_inference(cclient: grpcclient.InferenceServerClient, device_regions: dict) -> None:
    status = cclient.get_cuda_shared_memory_status().regions
    assert set(status) == {"input0", "input1", "output0", "output1"}
    assert (status["input0"].name, status["input0"].device_id, status["input0"].byte_size) == (
        "input0",
        0,
        64,
    )
    result = cclient.infer("simple", _inputs(), outputs=_outputs())
    assert list(result.get_response().raw_output_contents) == [b"", b""]
    _check_outputs(device_regions)


def test_stream_inference(cclient: grpcclient.InferenceServerClient, device_regions: dict) -> None:
    results: queue.Queue = queue.Queue()
    cclient.start_stream(callback=lambda result, error: results.put(error))
    try:
        cclient.async_stream_infer("simple", _inputs(), outputs=_outputs())
        assert results.get(timeout=60) is None
    finally:
        cclient.stop_stream()
    _check_outputs(device_regions)


def _expect(call, code: str, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}"
    assert message in info.value.message(), info.value.message()


def test_errors(cclient: grpcclient.InferenceServerClient, device_regions: dict) -> None:
    raw = cudashm.get_raw_handle(device_regions["input0"])
    _expect(
        lambda: cclient.register_cuda_shared_memory("input0", raw, 0, 64),
        "ALREADY_EXISTS",
        "shared memory region 'input0' already in manager",
    )
    with pytest.raises(
        InferenceServerException, match="failed to register shared memory region.*invalid args"
    ):
        cclient.register_cuda_shared_memory("", b"", 0, 0)
    big = cudashm.create_shared_memory_region("big", 128, 0)
    try:
        cclient.register_cuda_shared_memory("big", cudashm.get_raw_handle(big), 0, 128)
        _expect(
            lambda: cclient.infer("simple", _inputs(("big", 128)), outputs=_outputs()),
            "INVALID_ARGUMENT",
            "input byte size mismatch for input 'INPUT1' for model 'simple'. Expected 64, got 128",
        )
        cclient.unregister_cuda_shared_memory("big")
    finally:
        cudashm.destroy_shared_memory_region(big)
    _expect(
        lambda: cclient.infer("simple", _inputs(), outputs=_outputs(offset=64)),
        "INVALID_ARGUMENT",
        "Invalid offset for shared memory region: 'output0'",
    )
    _expect(
        lambda: cclient.infer("simple", _inputs(), outputs=_outputs(offset=32)),
        "INVALID_ARGUMENT",
        "Invalid offset + byte size for shared memory region: 'output0'",
    )
    _expect(
        lambda: cclient.get_cuda_shared_memory_status("missing"),
        "NOT_FOUND",
        "Unable to find cuda shared memory region: 'missing'",
    )
    _expect(
        lambda: cclient.get_system_shared_memory_status("input0"),
        "NOT_FOUND",
        "The region named 'input0' is registered as CUDA shared memory, not system shared memory",
    )


def test_register_larger_than_the_allocation_fails(cclient: grpcclient.InferenceServerClient) -> None:
    handle = cudashm.create_shared_memory_region("small", 64, 0)
    try:
        with pytest.raises(
            InferenceServerException, match="failed to register shared memory region.*invalid args"
        ):
            cclient.register_cuda_shared_memory("small", cudashm.get_raw_handle(handle), 0, 1 << 30)
        assert not cclient.get_cuda_shared_memory_status().regions
    finally:
        cudashm.destroy_shared_memory_region(handle)


def test_unregister_all(cclient: grpcclient.InferenceServerClient, device_regions: dict) -> None:
    cclient.unregister_cuda_shared_memory("output1")
    assert set(cclient.get_cuda_shared_memory_status().regions) == {"input0", "input1", "output0"}
    cclient.unregister_cuda_shared_memory()
    assert not cclient.get_cuda_shared_memory_status().regions
