"""``execute_on_loop``: cheap models batched and run on the server's event loop, not a worker thread.

Policy-level tests drive DirectPolicy/DynamicPolicy with responders that name a loop (as the server's
do); server-level tests check ``simple`` (which declares itself cheap) through tritonclient, with BLS
calls into it from another model's thread at the same time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pagedserve.backend import ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.repository import spec_from_document
from pagedserve.responder import Delivery, LoopMailbox
from pagedserve.statistics import ModelStats
from pagedserve_plugins.batching import DirectPolicy, DynamicPolicy
from pagedserve_plugins.sequence_batching import SequencePolicy
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .recorder import Recorder


class LoopRecorder(Recorder):
    """A Recorder that, like the server's responders, names the loop its responses go to."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.event_loop = loop


class ThreadRecordingModel:
    """Answers OUT = request id; records each batch's ids and the thread that ran it."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.threads: list[int] = []
        self.fail = fail

    def execute(self, requests: list[InferenceRequest]) -> None:
        self.batches.append([r.id for r in requests])
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("model broke")
        for request in requests:
            request.responder.send(InferenceResponse(outputs={"OUT": np.array([request.id])}), final=True)

    def memory_bytes(self) -> dict[str, int]:
        return {}

    def finalize(self) -> None:
        pass


def make_spec(on_loop: bool = True, **config: Any) -> ModelSpec:
    document = {
        "name": "m",
        "backend": "python",
        "max_batch_size": 4,
        "input": [{"name": "INPUT", "data_type": "TYPE_INT32", "dims": [1]}],
        "output": [{"name": "OUT", "data_type": "TYPE_INT32", "dims": [1]}],
        "parameters": {"execute_on_loop": {"string_value": "true" if on_loop else "false"}},
        **config,
    }
    return spec_from_document("m", document)


def make_request(ident: str, responder: Recorder) -> InferenceRequest:
    return InferenceRequest(
        model_name="m",
        model_version=1,
        inputs={"INPUT": np.zeros((1, 1), np.int32)},
        requested_outputs=["OUT"],
        responder=responder,
        id=ident,
    )


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_one_loop_iterations_requests_run_as_batches_on_the_loop() -> None:
    """Requests submitted by tasks of one loop turn (as the front-ends' requests are) wait for the
    turn's end and run as batches."""
    model = ThreadRecordingModel()
    policy = DynamicPolicy(model, make_spec(dynamic_batching={}), ModelStats())  # type: ignore[arg-type]

    async def scenario() -> list[LoopRecorder]:
        loop = asyncio.get_running_loop()
        recorders = [LoopRecorder(loop) for _ in range(10)]
        ran_at_submit: list[int] = []

        async def client(index: int) -> None:
            policy.submit(make_request(str(index), recorders[index]))
            ran_at_submit.append(len(model.batches))

        await asyncio.gather(*(client(i) for i in range(10)))
        assert ran_at_submit == [0] * 10  # the others were ready to run: none ran inside submit
        await _settle()
        return recorders

    recorders = asyncio.run(scenario())
    policy.close()
    assert all(r.done.is_set() for r in recorders)
    assert [len(b) for b in model.batches] == [4, 4, 2]
    assert [i for b in model.batches for i in b] == [str(i) for i in range(10)]
    assert set(model.threads) == {threading.get_ident()}
    assert policy._workers == []


def test_a_request_with_nothing_else_ready_on_the_loop_runs_inside_submit() -> None:
    """Nothing could join its batch before the loop got to it: it runs at once (two loop turns saved
    per request at low load)."""
    model = ThreadRecordingModel()
    policy = DynamicPolicy(model, make_spec(dynamic_batching={}), ModelStats())  # type: ignore[arg-type]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await _settle()
        for index in range(3):
            recorder = LoopRecorder(loop)
            policy.submit(make_request(str(index), recorder))
            assert model.batches[-1] == [str(index)]
            await _settle()
            assert recorder.done.is_set()

    asyncio.run(scenario())
    policy.close()
    assert model.batches == [["0"], ["1"], ["2"]]


def test_a_request_submitted_while_a_lone_request_runs_is_drained_after_it() -> None:
    """The lone request runs without a queue entry; one submitted meanwhile (here by the model
    itself) queues behind it and runs in the loop's next turn; both count as executions."""
    stats = ModelStats()

    class Resubmitting(ThreadRecordingModel):
        def execute(self, requests: list[InferenceRequest]) -> None:
            if [r.id for r in requests] == ["0"]:
                policy.submit(make_request("1", second))
            super().execute(requests)

    model = Resubmitting()
    policy = DynamicPolicy(model, make_spec(dynamic_batching={}), stats)  # type: ignore[arg-type]

    async def scenario() -> None:
        nonlocal second
        loop = asyncio.get_running_loop()
        second = LoopRecorder(loop)
        await _settle()
        first = LoopRecorder(loop)
        policy.submit(make_request("0", first))
        assert model.batches == [["0"]] and first.done.is_set() and not second.done.is_set()
        await _settle()
        assert model.batches == [["0"], ["1"]] and second.done.is_set()

    second: LoopRecorder
    asyncio.run(scenario())
    policy.close()
    snap = stats.snapshot()
    assert snap.execution_count == 2 and snap.batches[1].compute_infer.count == 2
    assert not policy._has_queued() and not policy._draining


def test_without_the_parameter_a_worker_thread_runs_the_model() -> None:
    model = ThreadRecordingModel()
    policy = DirectPolicy(model, make_spec(on_loop=False), ModelStats())  # type: ignore[arg-type]
    recorder = Recorder()
    policy.submit(make_request("0", recorder))
    assert recorder.final().error is None
    policy.close()
    assert model.threads != [threading.get_ident()]


def test_a_request_from_another_thread_runs_in_that_thread() -> None:
    model = ThreadRecordingModel()
    policy = DirectPolicy(model, make_spec(), ModelStats())  # type: ignore[arg-type]
    recorders = [Recorder() for _ in range(3)]

    def submit_all() -> int:
        for index, recorder in enumerate(recorders):
            policy.submit(make_request(str(index), recorder))
            assert recorder.done.is_set()  # answered before submit returned
        return threading.get_ident()

    with ThreadPoolExecutor(1) as pool:
        caller = pool.submit(submit_all).result(timeout=10)
    policy.close()
    assert set(model.threads) == {caller}
    assert [r.final().outputs["OUT"].tolist() for r in recorders] == [["0"], ["1"], ["2"]]


def test_a_failing_execute_answers_its_batch_and_the_loop_goes_on() -> None:
    model = ThreadRecordingModel(fail=True)
    policy = DirectPolicy(model, make_spec(), ModelStats())  # type: ignore[arg-type]

    async def scenario() -> tuple[LoopRecorder, LoopRecorder]:
        loop = asyncio.get_running_loop()
        first, second = LoopRecorder(loop), LoopRecorder(loop)
        policy.submit(make_request("a", first))
        await _settle()
        model.fail = False
        policy.submit(make_request("b", second))
        await _settle()
        return first, second

    first, second = asyncio.run(scenario())
    policy.close()
    assert first.error().code == grpc.StatusCode.INTERNAL
    assert "model broke" in first.error().message
    assert second.final().error is None


def test_close_runs_what_is_queued_then_refuses() -> None:
    model = ThreadRecordingModel()
    policy = DynamicPolicy(model, make_spec(dynamic_batching={}), ModelStats())  # type: ignore[arg-type]

    async def scenario() -> list[LoopRecorder]:
        loop = asyncio.get_running_loop()
        recorders = [LoopRecorder(loop) for _ in range(3)]
        for index, recorder in enumerate(recorders):
            policy.submit(make_request(str(index), recorder))
        policy.close()  # on the loop thread, before the loop ran the drain it scheduled
        await _settle()
        return recorders

    recorders = asyncio.run(scenario())
    assert all(r.final().error is None for r in recorders)
    with pytest.raises(InferenceError) as raised:
        policy.submit(make_request("late", Recorder()))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("policy", "config", "message"),
    [
        (SequencePolicy, {"sequence_batching": {}}, "not supported by the 'sequence' batching policy"),
        (
            DynamicPolicy,
            {"dynamic_batching": {"max_queue_delay_microseconds": 100}},
            "max_queue_delay_microseconds 0",
        ),
    ],
)
def test_settings_that_need_a_waiting_worker_are_refused(policy: Any, config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(ThreadRecordingModel(), make_spec(**config), ModelStats())


def test_a_post_from_the_loop_thread_needs_no_wakeup() -> None:
    delivered: list[Delivery] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox(loop)

        def no_wakeup(*args: Any) -> None:
            raise AssertionError("call_soon_threadsafe from the loop's own thread")

        loop.call_soon_threadsafe = no_wakeup  # type: ignore[method-assign]
        mailbox.post(delivered.append, Delivery(None, None, True))
        assert delivered == []  # delivered on the next iteration, never inside post
        await _settle()

    asyncio.run(scenario())
    assert len(delivered) == 1


# -- through the server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_server("model=[simple,bls_add_sub]", "frontends=[grpc]")
    yield process
    process.stop()


def _inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput(n, list(a.shape), "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_concurrent_clients_and_bls_calls_get_their_own_answers(server: ServerProcess) -> None:
    """16 gRPC clients on ``simple`` (batched on the loop) while BLS calls reach it from a worker."""

    def client_loop(seed: int) -> None:
        client = grpcclient.InferenceServerClient(server.url)
        model = "bls_add_sub" if seed % 4 == 0 else "simple"
        for step in range(20):
            a = np.full((1 + step % 3, 16), seed * 100 + step, dtype=np.int32)
            b = np.arange(16, dtype=np.int32)[None].repeat(len(a), 0)
            result = client.infer(model, _inputs(a, b))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(client_loop, seed) for seed in range(16)]:
            future.result(timeout=120)
    stats = grpcclient.InferenceServerClient(server.url).get_inference_statistics("simple")
    simple = stats.model_stats[0]
    assert simple.inference_stats.fail.count == 0
    assert simple.inference_stats.success.count == 16 * 20


def test_a_bad_request_is_refused_and_the_loop_keeps_serving(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    a = np.zeros((1, 16), np.int32)
    bad = _inputs(a, a)
    bad[1] = grpcclient.InferInput("INPUT1", [1, 15], "INT32")
    bad[1].set_data_from_numpy(np.zeros((1, 15), np.int32))
    with pytest.raises(InferenceServerException, match="unexpected shape for input 'INPUT1'"):
        client.infer("simple", bad)
    result = client.infer("simple", _inputs(a + 2, a + 1))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 3)
