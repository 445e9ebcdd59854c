"""Large (allowed) messages cost the server a few times their size while in flight, and give it back.

The server's memory is read from /proc: ``VmHWM`` (peak RSS) after resetting it through
``clear_refs``, so the peak of one request is exact rather than sampled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .conftest import ServerProcess, start_server

MiB = 2**20
# Large enough that allocator and interpreter noise (a few MiB) cannot decide a bound.
SIZE = 48 * MiB
SETTLE_S = 30.0


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """This module's own server: other tests' requests must not show in its memory."""
    try:
        _reset_peak(os.getpid())
    except OSError:
        pytest.skip("needs Linux /proc/<pid>/clear_refs to read a request's peak RSS")
    process = start_server("model=identity_fp32")
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with server.client() as c:
        yield c


def _echo(client: grpcclient.InferenceServerClient, data: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0")


def _large() -> np.ndarray:
    # Distinct values (exact in FP32 below 2**24) so a misplaced byte range shows.
    return np.arange(SIZE // 4, dtype=np.float32).reshape(1, -1)


def _settled_rss(pid: int, below: int) -> int:
    """RSS once it is below ``below`` (a call's last buffers go just after its answer arrives), or
    what it is after SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        rss = _memory(pid)["VmRSS"]
        if rss < below or time.monotonic() > deadline:
            return rss
        time.sleep(0.05)


def test_one_large_request_costs_a_few_times_its_size(server: ServerProcess, client) -> None:  # noqa: ANN001
    # gRPC alone holds a message 2-3 times while it arrives and once more while it leaves; before,
    # protobuf's copies on top made a 48 MiB echo cost 6-7x its size.
    pid = server.process.pid
    _echo(client, np.ones((1, 4), np.float32))
    data = _large()
    _reset_peak(pid)
    before = _memory(pid)["VmRSS"]
    echoed = _echo(client, data)
    peak = _memory(pid)["VmHWM"]
    np.testing.assert_array_equal(echoed, data)
    assert peak - before < 5 * SIZE, f"peak RSS grew {(peak - before) / SIZE:.1f}x the request's size"


def test_sequential_large_requests_give_their_memory_back(server: ServerProcess, client) -> None:  # noqa: ANN001
    # Before, each 48 MiB request left ~3x its size behind (a reference cycle kept the request and
    # both messages until a GC pass that large buffers never trigger), and glibc kept freed blocks.
    pid = server.process.pid
    _echo(client, np.ones((1, 4), np.float32))
    baseline = _memory(pid)["VmRSS"]
    data = _large()
    for _ in range(6):
        np.testing.assert_array_equal(_echo(client, data), data)
    grown = _settled_rss(pid, below=baseline + SIZE) - baseline
    assert grown < SIZE, f"RSS stayed {grown / MiB:.0f} MiB above its baseline"


def test_large_typed_contents_are_not_expanded_into_python_objects(server: ServerProcess) -> None:
    # ``fp32_contents`` became a list of Python floats first: a 32 MiB request cost 15x its size.
    pid = server.process.pid
    size = 32 * MiB
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, size // 4])
    values = np.arange(size // 4, dtype=np.float32)
    tensor.contents.fp32_contents.extend(values.tolist())
    limit = 2**31 - 1
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(server.url, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _reset_peak(pid)
        before = _memory(pid)["VmRSS"]
        reply = stub.ModelInfer(request, timeout=120)
        peak = _memory(pid)["VmHWM"]
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == values.tolist()
    assert peak - before < 10 * size, f"peak RSS grew {(peak - before) / size:.1f}x the request's size"
