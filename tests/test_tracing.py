"""TraceSetting and the trace exporters: Triton's keys, validation texts and clearing rules through the
stock tritonclient; the ``triton`` exporter's JSON files; the ``opentelemetry`` exporter's spans (in
memory, and over OTLP/gRPC to a collector run by the test)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from pagedserve.config import TracingConfig
from pagedserve.tracing import Trace, TraceSettings
from pagedserve_plugins.trace_opentelemetry import OpenTelemetryTraceExporter
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .test_server_api import simple_inputs

TIMELINE = [
    "GRPC_WAITREAD_START",
    "GRPC_WAITREAD_END",
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "INFER_RESPONSE_COMPLETE",
    "COMPUTE_END",
    "REQUEST_END",
    "GRPC_SEND_START",
    "GRPC_SEND_END",
]


def settings_response(**values: list[str]) -> object:
    from tritonclient.grpc import service_pb2

    response = service_pb2.TraceSettingResponse()
    json_format.ParseDict({"settings": {k: {"value": v} for k, v in values.items()}}, response)
    return response


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def traced(trace_dir: Path) -> Iterator[ServerProcess]:
    """Every request traced, one file per trace (``trace.json.<n>``)."""
    process = start_server(
        "model=[simple,repeat_int32]",
        f"tracing.file={trace_dir / 'trace.json'}",
        "tracing.level=[TIMESTAMPS]",
        "tracing.rate=1",
        "tracing.log_frequency=1",
    )
    yield process
    process.stop()


@pytest.fixture
def tclient(traced: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with traced.client() as client:
        yield client
        # back to the start-up state (trace_file cannot be sent, so it is not cleared)
        clear = dict.fromkeys(("trace_level", "trace_rate", "trace_count", "log_frequency"))
        client.update_trace_settings(model_name="simple", settings=clear)
        client.update_trace_settings(settings=clear)


def initial(trace_dir: Path, **changes: list[str]) -> object:
    values = {
        "trace_file": [str(trace_dir / "trace.json")],
        "trace_level": ["TIMESTAMPS"],
        "trace_rate": ["1"],
        "trace_count": ["-1"],
        "log_frequency": ["1"],
        "trace_mode": ["triton"],
    }
    return settings_response(**{**values, **changes})


# -- settings -----------------------------------------------------------------------------------------


def test_default_settings(client: grpcclient.InferenceServerClient) -> None:
    expected = settings_response(
        trace_file=[""],
        trace_level=["OFF"],
        trace_rate=["1000"],
        trace_count=["-1"],
        log_frequency=["0"],
        trace_mode=["triton"],
    )
    assert client.get_trace_settings() == expected
    assert client.get_trace_settings(model_name="simple") == expected


def test_model_follows_global_until_it_sets_a_key(
    tclient: grpcclient.InferenceServerClient, trace_dir: Path
) -> None:
    assert tclient.get_trace_settings(model_name="simple") == initial(trace_dir)
    assert tclient.update_trace_settings(model_name="simple", settings={"trace_rate": "12"}) == initial(
        trace_dir, trace_rate=["12"]
    )
    updated = tclient.update_trace_settings(
        settings={"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5"}
    )
    assert updated == initial(trace_dir, trace_level=["TIMESTAMPS", "TENSORS"], trace_rate=["5"])
    # the model keeps its own rate and follows the new global level
    assert tclient.get_trace_settings(model_name="simple") == initial(
        trace_dir, trace_level=["TIMESTAMPS", "TENSORS"], trace_rate=["12"]
    )


def test_clearing_falls_back(tclient: grpcclient.InferenceServerClient, trace_dir: Path) -> None:
    tclient.update_trace_settings(model_name="simple", settings={"trace_rate": "12", "log_frequency": "34"})
    tclient.update_trace_settings(settings={"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]})
    cleared_global = tclient.update_trace_settings(settings={"trace_rate": None, "trace_count": None})
    assert cleared_global == initial(trace_dir, trace_level=["OFF"])
    assert tclient.get_trace_settings(model_name="simple") == initial(
        trace_dir, trace_level=["OFF"], trace_rate=["12"], log_frequency=["34"]
    )
    cleared_model = tclient.update_trace_settings(
        model_name="simple", settings={"trace_rate": None, "trace_level": None}
    )
    assert cleared_model == initial(trace_dir, trace_level=["OFF"], log_frequency=["34"])
    assert tclient.get_trace_settings() == initial(trace_dir, trace_level=["OFF"])


@pytest.mark.parametrize(
    ("model", "settings", "code", "message"),
    [
        (
            "",
            {"trace_file": "x.json"},
            "UNIMPLEMENTED",
            "trace file location can not be updated through network protocol",
        ),
        ("does-not-exist", {}, "INVALID_ARGUMENT", "Request for unknown model : does-not-exist"),
        (
            "",
            {"trace_level": ["OFF", "TIMESTAMPS"]},
            "INVALID_ARGUMENT",
            "Expect only one trace level 'OFF' is specified",
        ),
        ("", {"trace_rate": ["1", "2"]}, "INVALID_ARGUMENT", "expect only 1 value for 'trace_rate'"),
        ("", {"trace_rate": "abc"}, "INVALID_ARGUMENT", "Unable to parse 'trace_rate', got: abc"),
        ("simple", {"log_frequency": "x"}, "INVALID_ARGUMENT", "Unable to parse 'log_frequency', got: x"),
        (
            "",
            {"trace_count": "-2"},
            "INVALID_ARGUMENT",
            "Unable to parse 'trace_count'. Expecting value >= -1, got: -2",
        ),
        (
            "",
            {"trace_rate": "-1"},
            "INVALID_ARGUMENT",
            "Unable to parse 'trace_rate', value is out of range [ 0, 4294967295 ], got: -1",
        ),
    ],
)
def test_setting_errors(
    tclient: grpcclient.InferenceServerClient,
    trace_dir: Path,
    model: str,
    settings: dict,
    code: str,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        tclient.update_trace_settings(model_name=model or None, settings=settings)
    assert info.value.status() == f"StatusCode.{code}"
    assert info.value.message() == message
    assert tclient.get_trace_settings() == initial(trace_dir)  # nothing changed


# -- the triton exporter's files ----------------------------------------------------------------------


def _wait_for_traces(trace_dir: Path, seen: set[Path], count: int, timeout: float = 15.0) -> list[list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        new = sorted(set(trace_dir.glob("trace.json.*")) - seen, key=lambda p: int(p.suffix[1:]))
        if len(new) >= count or time.monotonic() > deadline:
            seen.update(new)
            return [json.loads(path.read_text()) for path in new]
        time.sleep(0.05)


def _timestamps(entries: list[dict]) -> list[str]:
    return [stamp["name"] for entry in entries for stamp in entry.get("timestamps", [])]


def test_trace_file_records_the_timeline(tclient: grpcclient.InferenceServerClient, trace_dir: Path) -> None:
    seen = set(trace_dir.glob("trace.json.*"))
    tclient.infer("simple", simple_inputs(), request_id="traced-1")
    (entries,) = _wait_for_traces(trace_dir, seen, 1)
    header = entries[0]
    assert (header["model_name"], header["model_version"], header["request_id"]) == ("simple", 1, "traced-1")
    assert all(entry["id"] == header["id"] for entry in entries)
    assert _timestamps(entries) == TIMELINE
    stamps = [entry["timestamps"][0]["ns"] for entry in entries[1:]]
    assert stamps == sorted(stamps)


def test_rate_count_and_tensors(tclient: grpcclient.InferenceServerClient, trace_dir: Path) -> None:
    tclient.update_trace_settings(
        model_name="simple",
        settings={"trace_rate": "2", "trace_count": "2", "trace_level": ["TIMESTAMPS", "TENSORS"]},
    )
    seen = set(trace_dir.glob("trace.json.*"))
    for _ in range(6):
        tclient.infer("simple", simple_inputs())
    traces = _wait_for_traces(trace_dir, seen, 3, timeout=3.0)
    assert len(traces) == 2, "rate 2 over 6 requests is 3 traces, capped at 2 by the count"
    assert tclient.get_trace_settings(model_name="simple").settings["trace_count"].value == ["0"]
    assert tclient.get_trace_settings().settings["trace_count"].value == ["-1"]
    tensors = {(e["activity"], e["tensor"]["name"]): e["tensor"] for e in traces[0] if "activity" in e}
    assert set(tensors) == {
        ("TENSOR_QUEUE_INPUT", "INPUT0"),
        ("TENSOR_QUEUE_INPUT", "INPUT1"),
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT0"),
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT1"),
    }
    assert tensors[("TENSOR_QUEUE_INPUT", "INPUT0")] == {
        "name": "INPUT0",
        "data": ",".join(str(i) for i in range(16)),
        "shape": "1,16",
        "dtype": "INT32",
    }


def test_streamed_responses_are_traced(tclient: grpcclient.InferenceServerClient, trace_dir: Path) -> None:
    seen = set(trace_dir.glob("trace.json.*"))
    inputs = []
    for name, data in (
        ("IN", np.array([4, 5], np.int32)),
        ("DELAY", np.array([1, 1], np.uint32)),
        ("WAIT", np.array([0], np.uint32)),
    ):
        tensor = grpcclient.InferInput(name, list(data.shape), "INT32" if name == "IN" else "UINT32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    results: queue.Queue = queue.Queue()
    tclient.start_stream(callback=lambda result, error: results.put(error))
    try:
        tclient.async_stream_infer("repeat_int32", inputs, enable_empty_final_response=True)
        assert [results.get(timeout=30) for _ in range(3)] == [None, None, None]
    finally:
        tclient.stop_stream()
    (entries,) = _wait_for_traces(trace_dir, seen, 1)
    names = _timestamps(entries)
    assert entries[0]["model_name"] == "repeat_int32"
    assert names.count("INFER_RESPONSE_COMPLETE") == 2  # one per streamed response
    assert names[-2:] == ["GRPC_SEND_START", "GRPC_SEND_END"]


def test_log_frequency_zero_writes_at_shutdown(tmp_path: Path) -> None:
    process = start_server(
        "model=[simple]",
        f"tracing.file={tmp_path / 't.json'}",
        "tracing.level=[TIMESTAMPS]",
        "tracing.rate=1",
    )
    try:
        with process.client() as client:
            for _ in range(2):
                client.infer("simple", simple_inputs())
        assert not (tmp_path / "t.json").exists()
    finally:
        assert process.stop() == 0
    entries = json.loads((tmp_path / "t.json").read_text())
    assert len({entry["id"] for entry in entries}) == 2
    assert not list(tmp_path.glob("t.json.*"))


# -- the opentelemetry exporter ------------------------------------------------------------------


def _fake_trace() -> Trace:
    trace = Trace(7, "simple", 1, "otel-1", frozenset({"TIMESTAMPS"}), 0)
    for offset, name in enumerate(TIMELINE):
        trace.mark(name, 1_000_000 + offset * 1000)
    return trace


def test_opentelemetry_spans_in_memory() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    exporter = OpenTelemetryTraceExporter(TracingConfig(mode="opentelemetry"), span_exporter=memory)
    trace = _fake_trace()
    exporter.export(trace)
    exporter.close()
    spans = {span.name: span for span in memory.get_finished_spans()}
    assert set(spans) == {"InferRequest", "simple", "compute"}
    root, model, compute = spans["InferRequest"], spans["simple"], spans["compute"]
    assert model.parent.span_id == root.context.span_id
    assert compute.parent.span_id == model.context.span_id
    assert len({root.context.trace_id, model.context.trace_id, compute.context.trace_id}) == 1
    assert dict(model.attributes) == {
        "model_name": "simple",
        "model_version": 1,
        "request_id": "otel-1",
        "trace_id": 7,
    }
    assert model.start_time == 1_000_000 + 2000 + trace.epoch_offset_ns  # REQUEST_START, on the wall clock
    assert [e.name for e in compute.events] == TIMELINE[4:9]
    assert "QUEUE_START" in [e.name for e in model.events]
    assert root.end_time - root.start_time == (len(TIMELINE) - 1) * 1000


def test_opentelemetry_settings_keys() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    config = TracingConfig(mode="opentelemetry")
    exporter = OpenTelemetryTraceExporter(config, span_exporter=InMemorySpanExporter())
    rendered = TraceSettings(config).render("", exporter)
    exporter.close()
    assert rendered["trace_mode"] == ["opentelemetry"]
    assert "trace_file" not in rendered and "log_frequency" not in rendered
    assert rendered["url"] == ["localhost:4317"]
    assert rendered["resource"] == ["service.name=pagedserve"]


class _Collector:
    """A minimal OTLP/gRPC trace collector (the test process's side of the exporter)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        received: queue.Queue = queue.Queue()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: ANN001, ANN202, N802 - grpc's names
                received.put(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.received = received
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def span_names(self, timeout: float) -> set[str]:
        names: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(names) < 3 and time.monotonic() < deadline:
            try:
                request = self.received.get(timeout=0.2)
            except queue.Empty:
                continue
            names |= {s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}
        return names


def test_opentelemetry_mode_exports_over_otlp() -> None:
    collector = _Collector()
    process = start_server(
        "model=[simple]",
        "tracing.mode=opentelemetry",
        "tracing.level=[TIMESTAMPS]",
        "tracing.rate=1",
        f"tracing.opentelemetry.url=127.0.0.1:{collector.port}",
        "tracing.opentelemetry.bsp_schedule_delay=100",
    )
    try:
        with process.client() as client:
            settings = client.get_trace_settings().settings
            assert settings["trace_mode"].value == ["opentelemetry"]
            assert "trace_file" not in settings
            client.infer("simple", simple_inputs())
        assert collector.span_names(timeout=20) == {"InferRequest", "simple", "compute"}
    finally:
        process.stop()
        collector.server.stop(0)


def test_unknown_trace_mode_is_a_config_error() -> None:
    with pytest.raises(RuntimeError, match=r"tracing\.mode: unknown trace exporter 'zipkin'"):
        start_server("tracing.mode=zipkin", ready_timeout=30)
