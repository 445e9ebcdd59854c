"""Batching policies (``pagedserve_plugins.batching``) against a recording model and fake responders."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
from pagedserve.backend import Model, ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.repository import spec_from_document
from pagedserve.statistics import ModelStats
from pagedserve_plugins import batching, sequence_batching
from pagedserve_plugins.batching import DirectPolicy, DynamicPolicy
from pagedserve_plugins.sequence_batching import SequencePolicy

from tests.recorder import Recorder

WAIT = 5.0  # generous upper bound for anything that should happen "soon"


class RecordingModel(Model):
    """Records each batch (request ids); answers OUT = request id; optionally blocks or raises."""

    def __init__(self, raise_error: Exception | None = None, answer_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.inputs: list[dict[str, np.ndarray]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.raise_error = raise_error
        self.answer_first = answer_first
        self._lock = threading.Lock()

    def execute(self, requests: list[InferenceRequest]) -> None:
        with self._lock:
            self.batches.append([r.id for r in requests])
            self.inputs.extend(dict(r.inputs) for r in requests)
        self.started.set()
        assert self.gate.wait(WAIT)
        if self.raise_error is not None:
            if self.answer_first:
                requests[0].responder.send(InferenceResponse(outputs={"OUT": np.array([0])}), final=True)
            raise self.raise_error
        for request in requests:
            request.responder.send(InferenceResponse(outputs={"OUT": np.array([request.id])}), final=True)

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    def busy_with(self, policy: batching.BatchingPolicy, request: InferenceRequest) -> None:
        """Start ``request`` and hold the model inside it, so what is submitted next queues."""
        self.hold()
        policy.submit(request)
        assert self.started.wait(WAIT)


def make_spec(**config: Any) -> ModelSpec:
    document = {
        "name": "m",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "INPUT", "data_type": "TYPE_INT32", "dims": [1]}],
        "output": [{"name": "OUT", "data_type": "TYPE_INT32", "dims": [1]}],
        **config,
    }
    return spec_from_document("m", document)


def make_request(ident: str, batch_size: int = 1, **fields: Any) -> tuple[InferenceRequest, Recorder]:
    recorder = Recorder()
    request = InferenceRequest(
        model_name="m",
        model_version=1,
        inputs={"INPUT": np.zeros((batch_size, 1), np.int32)},
        requested_outputs=["OUT"],
        responder=recorder,
        id=ident,
        batch_size=batch_size,
        **fields,
    )
    request.timing.queued_ns = time.monotonic_ns()
    return request, recorder


def submit_all(policy: batching.BatchingPolicy, requests: list[tuple[InferenceRequest, Recorder]]) -> None:
    for request, _ in requests:
        policy.submit(request)


def wait_all(recorders: list[Recorder]) -> None:
    for recorder in recorders:
        assert recorder.done.wait(WAIT)


@pytest.fixture
def policies() -> Any:
    """Builds policies and closes them after the test, even when it fails."""
    made: list[batching.BatchingPolicy] = []

    def build(cls: type[batching.BatchingPolicy], model: Model, spec: ModelSpec) -> Any:
        policy = cls(model, spec, ModelStats())
        made.append(policy)
        return policy

    yield build
    for policy in made:
        policy.close()


def test_hooks_list_the_three_policies() -> None:
    names = [cls.name for cls in batching.pagedserve_batching_policies()]
    names += [cls.name for cls in sequence_batching.pagedserve_batching_policies()]
    assert names == ["direct", "dynamic", "sequence"]


# -- direct --------------------------------------------------------------------------------------


def test_direct_runs_each_request_alone(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(DirectPolicy, model, make_spec())
    requests = [make_request(str(i)) for i in range(5)]
    submit_all(policy, requests)
    wait_all([r for _, r in requests])
    assert sorted(model.batches) == [[str(i)] for i in range(5)]
    assert requests[3][1].final().outputs["OUT"].tolist() == ["3"]


def test_direct_runs_one_worker_per_instance(policies: Any) -> None:
    barrier = threading.Barrier(2, timeout=WAIT)

    class Together(RecordingModel):
        def execute(self, requests: list[InferenceRequest]) -> None:
            barrier.wait()  # only passes if two instances execute at the same time
            super().execute(requests)

    policy = policies(DirectPolicy, Together(), make_spec(instance_group=[{"kind": "KIND_CPU", "count": 2}]))
    requests = [make_request(str(i)) for i in range(2)]
    submit_all(policy, requests)
    wait_all([r for _, r in requests])
    assert all(r.final().error is None for _, r in requests)


def test_execute_error_answers_every_open_request(policies: Any) -> None:
    model = RecordingModel(raise_error=RuntimeError("boom"), answer_first=True)
    policy = policies(DynamicPolicy, model, make_spec(dynamic_batching={}))
    first = make_request("0")
    model.busy_with(policy, first[0])
    rest = [make_request(str(i)) for i in (1, 2)]
    submit_all(policy, rest)
    model.gate.set()
    wait_all([r for _, r in [first, *rest]])
    assert first[1].final().error is None  # answered before the model raised
    assert [len(r.sent) for _, r in rest] == [1, 1]
    assert rest[1][1].error().code == grpc.StatusCode.INTERNAL
    assert rest[1][1].error().message == "boom"


def test_execute_inference_error_keeps_its_code(policies: Any) -> None:
    model = RecordingModel(raise_error=InferenceError.unavailable("busy"))
    policy = policies(DirectPolicy, model, make_spec())
    request, recorder = make_request("0")
    policy.submit(request)
    assert recorder.error().code == grpc.StatusCode.UNAVAILABLE
    assert recorder.error().message == "busy"


def test_statistics_count_executions_by_batch_size(policies: Any) -> None:
    model = RecordingModel()
    stats = ModelStats()
    policy = DynamicPolicy(model, make_spec(dynamic_batching={}), stats)
    try:
        request, recorder = make_request("0", batch_size=3)
        request.timing.compute_input_ns = 1000
        policy.submit(request)
        wait_all([recorder])
    finally:
        policy.close()
    snapshot = stats.snapshot()
    assert snapshot.execution_count == 1
    assert list(snapshot.batches) == [3]
    assert snapshot.batches[3].compute_input.ns >= 1000
    assert request.timing.compute_start_ns <= request.timing.compute_end_ns


def test_cancelled_requests_are_not_executed(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(DirectPolicy, model, make_spec())
    request, recorder = make_request("0")
    recorder.is_cancelled = True
    policy.submit(request)
    assert recorder.error().code == grpc.StatusCode.CANCELLED
    assert model.batches == []


def test_close_drains_queued_requests_then_refuses(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(dynamic_batching={"max_queue_delay_microseconds": 60_000_000})
    policy = DynamicPolicy(model, spec, ModelStats())
    requests = [make_request(str(i)) for i in range(3)]
    submit_all(policy, requests)  # the huge delay keeps them queued until close flushes them
    closer = threading.Thread(target=policy.close)
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert all(r.final().error is None for _, r in requests)
    late, _ = make_request("late")
    with pytest.raises(InferenceError) as raised:
        policy.submit(late)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


# -- dynamic -------------------------------------------------------------------------------------


def test_dynamic_batches_up_to_max_batch_size(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(DynamicPolicy, model, make_spec(max_batch_size=4, dynamic_batching={}))
    model.busy_with(policy, make_request("first")[0])
    queued = [make_request(str(i)) for i in range(10)]
    submit_all(policy, queued)
    model.gate.set()
    wait_all([r for _, r in queued])
    assert [len(b) for b in model.batches] == [1, 4, 4, 2]
    assert [i for b in model.batches[1:] for i in b] == [str(i) for i in range(10)]  # arrival order kept


def test_dynamic_counts_batch_sizes_not_requests(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(DynamicPolicy, model, make_spec(max_batch_size=4, dynamic_batching={}))
    model.busy_with(policy, make_request("first")[0])
    queued = [make_request(str(i), batch_size=size) for i, size in enumerate([3, 2, 2, 1])]
    submit_all(policy, queued)
    model.gate.set()
    wait_all([r for _, r in queued])
    assert model.batches[1:] == [["0"], ["1", "2"], ["3"]]


def test_dynamic_prefers_preferred_batch_sizes(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(
        dynamic_batching={"preferred_batch_size": [2], "max_queue_delay_microseconds": 60_000_000}
    )
    policy = DynamicPolicy(model, spec, ModelStats())
    model.busy_with(policy, make_request("first", batch_size=2)[0])  # a preferred size: runs at once
    queued = [make_request(str(i)) for i in range(5)]
    submit_all(policy, queued)
    model.gate.set()
    wait_all([r for _, r in queued[:4]])
    time.sleep(0.05)
    assert not queued[4][1].done.is_set()  # a single request waits for more (the delay is huge)
    policy.close()  # closing flushes it
    assert [len(b) for b in model.batches] == [1, 2, 2, 1]


def test_dynamic_waits_up_to_the_queue_delay(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(dynamic_batching={"max_queue_delay_microseconds": 300_000})
    policy = policies(DynamicPolicy, model, spec)
    request, recorder = make_request("0")
    started = time.monotonic()
    policy.submit(request)
    time.sleep(0.1)
    more = [make_request(str(i)) for i in (1, 2)]
    submit_all(policy, more)
    wait_all([recorder, *(r for _, r in more)])
    assert time.monotonic() - started >= 0.29
    assert model.batches == [["0", "1", "2"]]


def test_dynamic_full_batch_does_not_wait_for_the_delay(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(max_batch_size=2, dynamic_batching={"max_queue_delay_microseconds": 60_000_000})
    policy = policies(DynamicPolicy, model, spec)
    requests = [make_request(str(i)) for i in range(2)]
    submit_all(policy, requests)
    wait_all([r for _, r in requests])
    assert model.batches == [["0", "1"]]


def test_dynamic_priority_levels(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(max_batch_size=1, dynamic_batching={"priority_levels": 3, "default_priority_level": 2})
    policy = policies(DynamicPolicy, model, spec)
    model.busy_with(policy, make_request("first")[0])
    queued = [
        make_request("low", priority=3),
        make_request("default", priority=0),
        make_request("out-of-range", priority=9),  # Triton treats it as the default level
        make_request("high", priority=1),
    ]
    submit_all(policy, queued)
    model.gate.set()
    wait_all([r for _, r in queued])
    assert [b[0] for b in model.batches] == ["first", "high", "default", "out-of-range", "low"]


def test_dynamic_rejects_a_bad_default_priority_level() -> None:
    spec = make_spec(dynamic_batching={"priority_levels": 2, "default_priority_level": 0})
    with pytest.raises(ValueError, match="default_priority_level"):
        DynamicPolicy(RecordingModel(), spec, ModelStats())


def test_dynamic_max_queue_size(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(dynamic_batching={"default_queue_policy": {"max_queue_size": 2}})
    policy = policies(DynamicPolicy, model, spec)
    model.busy_with(policy, make_request("first")[0])
    submit_all(policy, [make_request("1"), make_request("2")])
    with pytest.raises(InferenceError) as raised:
        policy.submit(make_request("3")[0])
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == "[request id: 3] Exceeds maximum queue size"  # Triton's text
    model.gate.set()


def _delayed_count(policy: DynamicPolicy) -> int:
    with policy._cond:
        return sum(len(delayed) for delayed in policy._delayed)


def test_delayed_requests_count_towards_max_queue_size(policies: Any) -> None:
    """A request whose timeout passed under timeout_action DELAY still waits, so it still takes its
    place in the queue (Triton counts a level's delayed requests in its size)."""
    model = RecordingModel()
    spec = make_spec(
        dynamic_batching={
            "max_queue_delay_microseconds": 60_000_000,  # keeps the instance waiting for a fuller batch
            "default_queue_policy": {
                "max_queue_size": 1,
                "default_timeout_microseconds": 1,
                "timeout_action": "DELAY",
            },
        }
    )
    policy = policies(DynamicPolicy, model, spec)
    policy.submit(make_request("late")[0])
    deadline = time.monotonic() + WAIT
    while not _delayed_count(policy):  # the waiting instance moves it once its timeout passed
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with pytest.raises(InferenceError, match=r"^\[request id: next\] Exceeds maximum queue size$"):
        policy.submit(make_request("next")[0])


def test_delayed_requests_run_before_lower_priority_levels(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(
        dynamic_batching={
            "priority_levels": 2,
            "default_priority_level": 2,
            "priority_queue_policy": {
                "1": {"default_timeout_microseconds": 1, "timeout_action": "DELAY"},
            },
        }
    )
    policy = policies(DynamicPolicy, model, spec)
    model.busy_with(policy, make_request("first")[0])
    high, high_done = make_request("high-delayed", priority=1)
    low, low_done = make_request("low")
    policy.submit(low)
    policy.submit(high)
    submitted = time.monotonic_ns()
    while time.monotonic_ns() <= submitted + 1_000:  # past the 1 us timeout: "high" gets delayed
        pass
    model.gate.set()
    wait_all([high_done, low_done])
    assert model.batches == [["first"], ["high-delayed", "low"]]  # a delayed request keeps its level


def test_priority_queue_policy_overrides_the_default(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(
        dynamic_batching={
            "priority_levels": 2,
            "default_priority_level": 2,
            "default_queue_policy": {"max_queue_size": 1},
            "priority_queue_policy": {"1": {"max_queue_size": 3}},
        }
    )
    policy = policies(DynamicPolicy, model, spec)
    model.busy_with(policy, make_request("first")[0])
    submit_all(policy, [make_request(str(i), priority=1) for i in range(3)])
    policy.submit(make_request("low")[0])
    with pytest.raises(InferenceError, match="Exceeds maximum queue size"):
        policy.submit(make_request("low2")[0])
    model.gate.set()


def _timeout_case(
    policies: Any, queue_policy: dict[str, Any], timeout_us: int
) -> tuple[RecordingModel, Recorder]:
    model = RecordingModel()
    spec = make_spec(dynamic_batching={"default_queue_policy": queue_policy})
    policy = policies(DynamicPolicy, model, spec)
    model.busy_with(policy, make_request("first")[0])
    request, recorder = make_request("late", timeout_us=timeout_us)
    policy.submit(request)
    time.sleep(0.1)
    model.gate.set()
    recorder.final()
    return model, recorder


def test_request_timeout_expires_in_the_queue(policies: Any) -> None:
    model, recorder = _timeout_case(policies, {"allow_timeout_override": True}, timeout_us=20_000)
    assert recorder.error().code == grpc.StatusCode.UNAVAILABLE
    assert recorder.error().message == "Request timeout expired"
    assert model.batches == [["first"]]


def test_request_timeout_ignored_without_override(policies: Any) -> None:
    model, recorder = _timeout_case(policies, {}, timeout_us=20_000)
    assert recorder.final().error is None


def test_default_timeout_applies_to_every_request(policies: Any) -> None:
    _, recorder = _timeout_case(policies, {"default_timeout_microseconds": 20_000}, timeout_us=0)
    assert recorder.error().message == "Request timeout expired"


def test_timeout_override_may_only_shorten(policies: Any) -> None:
    policy = {"default_timeout_microseconds": 20_000, "allow_timeout_override": True}
    _, recorder = _timeout_case(policies, policy, timeout_us=60_000_000)
    assert recorder.error().message == "Request timeout expired"


def test_timeout_action_delay_runs_the_request_later(policies: Any) -> None:
    policy = {"default_timeout_microseconds": 20_000, "timeout_action": "DELAY"}
    _, recorder = _timeout_case(policies, policy, timeout_us=0)
    assert recorder.final().error is None


def test_timed_out_request_is_rejected_while_the_instance_waits(policies: Any) -> None:
    model = RecordingModel()
    spec = make_spec(
        dynamic_batching={
            "max_queue_delay_microseconds": 60_000_000,
            "default_queue_policy": {"allow_timeout_override": True},
        }
    )
    policy = policies(DynamicPolicy, model, spec)
    request, recorder = make_request("0", timeout_us=50_000)
    policy.submit(request)
    assert recorder.error().message == "Request timeout expired"
    assert model.batches == []


# -- sequence ------------------------------------------------------------------------------------

SEQUENCE = {
    "max_sequence_idle_microseconds": 5_000_000,
    "control_input": [
        {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
        {"name": "READY", "control": [{"kind": "CONTROL_SEQUENCE_READY", "int32_false_true": [0, 1]}]},
        {"name": "END", "control": [{"kind": "CONTROL_SEQUENCE_END", "fp32_false_true": [0.0, 1.0]}]},
        {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}]},
    ],
}


def sequence_spec(**overrides: Any) -> ModelSpec:
    return make_spec(sequence_batching={**SEQUENCE, **overrides.pop("sequence", {})}, **overrides)


def test_sequence_control_tensors(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(SequencePolicy, model, sequence_spec())
    steps = [
        make_request("a", sequence_id=42, sequence_start=True),
        make_request("b", sequence_id=42),
        make_request("c", sequence_id=42, sequence_end=True),
    ]
    for request, recorder in steps:
        policy.submit(request)
        recorder.final()
    start = [int(i["START"][0, 0]) for i in model.inputs]
    end = [float(i["END"][0, 0]) for i in model.inputs]
    assert start == [1, 0, 0]
    assert end == [0.0, 0.0, 1.0]
    assert all(i["READY"].tolist() == [[1]] for i in model.inputs)
    assert model.inputs[0]["CORRID"].dtype == np.uint64
    assert model.inputs[0]["CORRID"].tolist() == [[42]]
    assert model.inputs[0]["START"].dtype == np.int32 and model.inputs[0]["END"].dtype == np.float32


def test_sequence_control_tensors_without_batching(policies: Any) -> None:
    policy = policies(SequencePolicy, RecordingModel(), sequence_spec(max_batch_size=0))
    request, _ = make_request("a", sequence_id=7, sequence_start=True)
    tensors = policy.control_tensors(request)
    assert {name: t.shape for name, t in tensors.items()} == {
        n: (1,) for n in ("START", "READY", "END", "CORRID")
    }


def test_sequence_string_correlation_id(policies: Any) -> None:
    corrid = {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_STRING"}]}
    spec = sequence_spec(sequence={"control_input": [corrid]})
    policy = policies(SequencePolicy, RecordingModel(), spec)
    request, _ = make_request("a", sequence_id="abc", sequence_start=True)
    assert policy.control_tensors(request)["CORRID"].tolist() == [[b"abc"]]


def test_sequence_string_id_for_numeric_corrid_is_rejected(policies: Any) -> None:
    policy = policies(SequencePolicy, RecordingModel(), sequence_spec())
    with pytest.raises(InferenceError, match="integer correlation ID"):
        policy.submit(make_request("a", sequence_id="abc", sequence_start=True)[0])


def test_sequence_requires_a_correlation_id(policies: Any) -> None:
    policy = policies(SequencePolicy, RecordingModel(), sequence_spec())
    for missing in (0, ""):
        with pytest.raises(InferenceError) as raised:
            policy.submit(make_request("a", sequence_id=missing, sequence_start=True)[0])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.message == (
            "inference request to model 'm' must specify a non-zero or non-empty correlation ID"
        )


def test_sequence_requires_start_first(policies: Any) -> None:
    policy = policies(SequencePolicy, RecordingModel(), sequence_spec())
    with pytest.raises(InferenceError) as raised:
        policy.submit(make_request("a", sequence_id=5)[0])
    assert raised.value.message == (
        "inference request for sequence 5 to model 'm' must specify the START flag on the first request "
        "of the sequence"
    )
    # after END, the same id needs a new START
    request, recorder = make_request("b", sequence_id=5, sequence_start=True, sequence_end=True)
    policy.submit(request)
    recorder.final()
    with pytest.raises(InferenceError, match="must specify the START flag"):
        policy.submit(make_request("c", sequence_id=5)[0])


def test_sequence_keeps_order_and_instance(policies: Any) -> None:
    seen: dict[int | str, list[tuple[str, str]]] = {}
    lock = threading.Lock()

    class Tracking(RecordingModel):
        def execute(self, requests: list[InferenceRequest]) -> None:
            for request in requests:
                with lock:
                    seen.setdefault(request.sequence_id, []).append(
                        (request.id, threading.current_thread().name)
                    )
            time.sleep(0.002)
            super().execute(requests)

    spec = sequence_spec(instance_group=[{"kind": "KIND_CPU", "count": 2}])
    policy = policies(SequencePolicy, Tracking(), spec)
    recorders = []
    for step in range(6):
        for cid in (1, 2, 3):
            request, recorder = make_request(
                f"{cid}-{step}", sequence_id=cid, sequence_start=step == 0, sequence_end=step == 5
            )
            policy.submit(request)
            recorders.append(recorder)
    wait_all(recorders)
    for cid, runs in seen.items():
        assert [ident for ident, _ in runs] == [f"{cid}-{step}" for step in range(6)]
        assert len({thread for _, thread in runs}) == 1  # one instance per sequence


def test_sequence_batches_mix_sequences_one_request_each(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(SequencePolicy, model, sequence_spec())
    model.busy_with(policy, make_request("x", sequence_id=99, sequence_start=True)[0])
    requests = [
        make_request("a0", sequence_id=1, sequence_start=True),
        make_request("a1", sequence_id=1),
        make_request("b0", sequence_id=2, sequence_start=True),
    ]
    submit_all(policy, requests)
    model.gate.set()
    wait_all([r for _, r in requests])
    assert model.batches == [["x"], ["a0", "b0"], ["a1"]]


def test_sequence_slots_are_reused_after_end(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(SequencePolicy, model, sequence_spec(max_batch_size=1))  # one slot
    first = make_request("a0", sequence_id=1, sequence_start=True)
    waiting = make_request("b0", sequence_id=2, sequence_start=True)
    submit_all(policy, [first, waiting])
    first[1].final()
    time.sleep(0.05)
    assert not waiting[1].done.is_set()  # sequence 2 waits for the only slot
    end = make_request("a1", sequence_id=1, sequence_end=True)
    policy.submit(end[0])
    wait_all([end[1], waiting[1]])
    assert model.batches == [["a0"], ["a1"], ["b0"]]


def test_idle_sequences_are_released(policies: Any) -> None:
    model = RecordingModel()
    policy = policies(
        SequencePolicy, model, sequence_spec(sequence={"max_sequence_idle_microseconds": 50_000})
    )
    request, recorder = make_request("a0", sequence_id=1, sequence_start=True)
    policy.submit(request)
    recorder.final()
    time.sleep(0.3)
    with pytest.raises(InferenceError, match="must specify the START flag"):
        policy.submit(make_request("a1", sequence_id=1)[0])


def test_sequence_control_input_needs_two_values() -> None:
    bad = {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [1]}]}
    with pytest.raises(ValueError, match="exactly two"):
        SequencePolicy(RecordingModel(), sequence_spec(sequence={"control_input": [bad]}), ModelStats())
