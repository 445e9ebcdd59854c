"""Explicit model control: load, reload with a config override, unload (in-flight requests finish)."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .test_server_api import simple_inputs


@pytest.fixture(scope="module")
def explicit_server() -> Iterator[ServerProcess]:
    server = start_server("model_control_mode=explicit", "model=[simple]")
    yield server
    server.stop()


@pytest.fixture
def client(explicit_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with explicit_server.client() as c:
        yield c


def test_only_named_models_load(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("simple_identity")
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states["simple"] == "READY" and states["simple_identity"] == ""


def test_load_override_and_reload(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("simple", config='{"max_batch_size": 16}')
    assert client.get_model_config("simple").config.max_batch_size == 16
    client.infer("simple", simple_inputs(batch=12))
    client.load_model("simple", config='{"max_batch_size": 8}')
    assert client.get_model_config("simple").config.max_batch_size == 8


@pytest.mark.parametrize(
    ("name", "config", "code", "message"),
    [
        (
            "wrong_model_name",
            None,
            "StatusCode.INTERNAL",
            "failed to load 'wrong_model_name', failed to poll from model repository",
        ),
        (
            "../simple",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "model name must not contain path traversal characters",
        ),
        (
            "a/../b",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "model name must not contain path traversal characters",
        ),
        (
            "  ",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "Model name cannot be empty. Please enter a valid name to deploy.",
        ),
        ("simple", '{"max_batch_size": "lots"}', "StatusCode.INVALID_ARGUMENT", "failed to load 'simple'"),
        ("simple", "not json", "StatusCode.INVALID_ARGUMENT", "failed to load 'simple'"),
    ],
)
def test_bad_loads(
    client: grpcclient.InferenceServerClient, name: str, config: str | None, code: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name, config=config)
    assert info.value.status() == code
    assert message in info.value.message()
    assert client.is_model_ready("simple")  # a failed reload keeps the serving version


def test_unload_waits_for_in_flight_requests(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("repeat_int32")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    values = np.arange(5, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("IN", [5], "INT32"),
        grpcclient.InferInput("DELAY", [5], "UINT32"),
        grpcclient.InferInput("WAIT", [1], "UINT32"),
    ]
    inputs[0].set_data_from_numpy(values)
    inputs[1].set_data_from_numpy(np.full(5, 100, dtype=np.uint32))
    inputs[2].set_data_from_numpy(np.array([0], dtype=np.uint32))
    client.async_stream_infer("repeat_int32", inputs, request_id="long")
    first = results.get(timeout=10)
    assert first[1] is None
    client.unload_model("repeat_int32")  # returns once the request above has finished
    client.stop_stream()
    received = [first] + [results.get_nowait() for _ in range(results.qsize())]
    assert [r.as_numpy("OUT")[0] for r, e in received if e is None] == list(values)
    assert not client.is_model_ready("repeat_int32")
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("repeat_int32", "1")].state == "UNAVAILABLE"
    assert index[("repeat_int32", "1")].reason == "unloaded"
    with pytest.raises(InferenceServerException, match="has no available versions"):
        client.get_model_metadata("repeat_int32")


def _wait_for(condition, timeout: float = 20.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_poll_mode_follows_the_repository(tmp_path) -> None:  # noqa: ANN001
    import shutil

    from .conftest import REPO

    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copy(REPO / "conf" / "models" / "simple.yaml", repository)
    server = start_server(f"repository={repository}", "model_control_mode=poll", "poll_interval_s=0.2")
    try:
        with server.client() as client:
            assert client.is_model_ready("simple") and not client.is_model_ready("simple_identity")
            shutil.copy(REPO / "conf" / "models" / "simple_identity.yaml", repository)
            _wait_for(lambda: client.is_model_ready("simple_identity"))
            path = repository / "simple.yaml"
            path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
            _wait_for(lambda: client.get_model_config("simple").config.max_batch_size == 4)
            path.unlink()
            _wait_for(lambda: not client.is_model_ready("simple"))
            with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
                client.load_model("simple")
    finally:
        server.stop()


def test_sigterm_drains_and_exits_cleanly() -> None:
    server = start_server("model=simple")
    with server.client() as client:
        client.infer("simple", simple_inputs())
    assert server.stop() == 0
    assert "shutting down" in server.output
