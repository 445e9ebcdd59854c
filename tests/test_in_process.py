"""The in-process client on a real model manager (no server): what ensembles and BLS build on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pagedserve_plugins.bls as pb_utils
import pytest
from pagedserve.in_process import MAX_DEPTH, Caller, InProcessClient
from pagedserve.model_manager import ModelManager

from .conftest import repository_manager

ROW = np.arange(16, dtype=np.int32).reshape(1, 16)


@pytest.fixture(scope="module")
def manager() -> Iterator[ModelManager]:
    manager = repository_manager()
    for name in ("simple", "repeat_int32", "bls_add_sub"):
        manager.load(name)
    yield manager
    manager.shutdown(timeout=10)


@pytest.fixture
def client(manager: ModelManager) -> InProcessClient:
    return manager.client


def test_call_returns_the_models_arrays_and_counts_in_its_statistics(
    client: InProcessClient, manager: ModelManager
) -> None:
    before = manager.resolve("simple").stats.snapshot().success.count
    response = client.call("simple", {"INPUT0": ROW, "INPUT1": ROW}).result(timeout_s=10)
    assert response.error is None
    np.testing.assert_array_equal(response.outputs["OUTPUT0"], 2 * ROW)
    assert response.outputs["OUTPUT0"].dtype == np.int32
    assert manager.resolve("simple").stats.snapshot().success.count == before + 1


@pytest.mark.parametrize(
    ("model", "inputs", "code", "message"),
    [
        (
            "nope",
            {"INPUT0": ROW},
            grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: 'nope' is not found",
        ),
        ("simple", {"INPUT0": ROW.astype(np.int64), "INPUT1": ROW}, None, "data-type is 'INT64', but model"),
        ("simple", {"INPUT0": ROW}, None, "missing required input(s) ['INPUT1']"),
        ("simple", {"INPUT0": ROW[:, :3], "INPUT1": ROW}, None, "unexpected shape for input 'INPUT0'"),
        ("simple", {"INPUT0": ROW, "INPUT1": ROW, "X": ROW}, None, "unexpected inference input 'X'"),
    ],
)
def test_a_request_that_cannot_start_answers_with_its_error(
    client: InProcessClient, model: str, inputs: dict, code: grpc.StatusCode | None, message: str
) -> None:
    response = client.call(model, inputs).result(timeout_s=10)
    assert response.error is not None and message in response.error.message
    assert response.error.code == (code or grpc.StatusCode.INVALID_ARGUMENT)


def test_versions_follow_tritons_convention(client: InProcessClient) -> None:
    assert client.call("simple", {"INPUT0": ROW, "INPUT1": ROW}, model_version=1).result().error is None
    missing = client.call("simple", {"INPUT0": ROW, "INPUT1": ROW}, model_version=3).result()
    assert "'simple' version 3 is not found" in missing.error.message


def test_async_readers_get_every_response_of_a_decoupled_model(client: InProcessClient) -> None:
    inputs = {
        "IN": np.array([7, 8], np.int32),
        "DELAY": np.array([1, 1], np.uint32),
        "WAIT": np.array([0], np.uint32),
    }

    async def read() -> list[list[int]]:
        call = client.call("repeat_int32", inputs)
        return [r.outputs["OUT"].tolist() async for r in call.aresponses(timeout_s=10) if r.outputs]

    assert asyncio.run(read()) == [[7], [8]]


def test_a_unary_read_of_a_streaming_model_is_an_error(client: InProcessClient) -> None:
    inputs = {
        "IN": np.array([1, 2], np.int32),
        "DELAY": np.array([0, 0], np.uint32),
        "WAIT": np.array([0], np.uint32),
    }
    response = client.call("repeat_int32", inputs).result(timeout_s=10)
    assert "sent more than one response" in response.error.message


def test_caller_chains_are_bounded(client: InProcessClient) -> None:
    looping = Caller(chain=(("bls_add_sub", 1), ("simple", 1)))
    response = client.call("simple", {"INPUT0": ROW, "INPUT1": ROW}, caller=looping).result()
    assert (
        "is already running this request's caller chain (bls_add_sub -> simple -> simple)"
        in response.error.message
    )
    deep = Caller(chain=tuple((f"m{i}", 1) for i in range(MAX_DEPTH)))
    response = client.call("simple", {"INPUT0": ROW, "INPUT1": ROW}, caller=deep).result()
    assert f"nest at most {MAX_DEPTH} models deep" in response.error.message


@pytest.mark.usefixtures("manager")  # loading a python model gives BLS its client
def test_bls_from_a_thread_the_model_started_reaches_the_loaded_models() -> None:
    results: list[pb_utils.InferenceResponse] = []

    def call() -> None:
        request = pb_utils.InferenceRequest(
            model_name="simple",
            requested_output_names=["OUTPUT1"],
            inputs=[pb_utils.Tensor("INPUT0", ROW), pb_utils.Tensor("INPUT1", ROW)],
        )
        results.append(request.exec())

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)
    assert not results[0].has_error()
    assert [t.name() for t in results[0].output_tensors()] == ["OUTPUT1"]
    np.testing.assert_array_equal(
        pb_utils.get_output_tensor_by_name(results[0], "OUTPUT1").as_numpy(), 0 * ROW
    )
