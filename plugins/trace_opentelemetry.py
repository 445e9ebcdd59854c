"""The ``opentelemetry`` trace exporter: each trace becomes OpenTelemetry spans sent over OTLP/gRPC.

Span layout follows Triton's OpenTelemetry mode: a root ``InferRequest`` span (request received to
response sent), a child span named after the model (REQUEST_START to REQUEST_END, with QUEUE_START as
an event) and a ``compute`` span under it (COMPUTE_START to COMPUTE_END, with the compute and
response timestamps as events). Spans carry ``model_name``, ``model_version`` and ``request_id``.
The SDK is imported only when this exporter is selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.config import TracingConfig
from pagedserve.hookspecs import hookimpl
from pagedserve.tracing import Trace, TraceExporter


@dataclass(frozen=True)
class _Layout:
    """One span of Triton's OpenTelemetry layout: its bounds, its events, and its child span."""

    start: str
    end: str
    events: frozenset[str]
    child: _Layout | None = None


_COMPUTE_SPAN = _Layout(
    "COMPUTE_START",
    "COMPUTE_END",
    frozenset(
        {
            "COMPUTE_START",
            "COMPUTE_INPUT_END",
            "COMPUTE_OUTPUT_START",
            "INFER_RESPONSE_COMPLETE",
            "COMPUTE_END",
        }
    ),
)
_MODEL_SPAN = _Layout(
    "REQUEST_START", "REQUEST_END", frozenset({"REQUEST_START", "QUEUE_START", "REQUEST_END"}), _COMPUTE_SPAN
)
_ROOT_EVENTS = frozenset({"GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END"})


def _add_events(span: Any, stamps: list[tuple[str, int]], names: frozenset[str]) -> None:
    for name, ns in stamps:
        if name in names:
            span.add_event(name, timestamp=ns)


class OpenTelemetryTraceExporter(TraceExporter):
    name = "opentelemetry"

    def __init__(self, config: TracingConfig, span_exporter: Any = None) -> None:
        """``span_exporter`` replaces the OTLP exporter (tests pass the SDK's in-memory one)."""
        super().__init__(config)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        otel = config.opentelemetry
        if span_exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter(endpoint=otel.url, insecure=True)
        attributes = dict(item.split("=", 1) for item in otel.resource)
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(
            BatchSpanProcessor(
                span_exporter,
                max_queue_size=otel.bsp_max_queue_size,
                schedule_delay_millis=otel.bsp_schedule_delay,
                max_export_batch_size=otel.bsp_max_export_batch_size,
            )
        )
        self.tracer = self.provider.get_tracer("pagedserve")

    def mode_settings(self) -> dict[str, list[str]]:
        otel = self.config.opentelemetry
        return {
            "url": [otel.url],
            "resource": list(otel.resource),
            "bsp_max_queue_size": [str(otel.bsp_max_queue_size)],
            "bsp_schedule_delay": [str(otel.bsp_schedule_delay)],
            "bsp_max_export_batch_size": [str(otel.bsp_max_export_batch_size)],
        }

    def export(self, trace: Trace) -> None:
        stamps = [(name, ns + trace.epoch_offset_ns) for name, ns in trace.timestamps]  # OTel: wall clock
        stamps.sort(key=lambda item: item[1])
        if not stamps:
            return
        attributes = {
            "model_name": trace.model_name,
            "model_version": trace.model_version,
            "request_id": trace.request_id,
            "trace_id": trace.id,
        }
        root = self.tracer.start_span("InferRequest", start_time=stamps[0][1], attributes=attributes)
        self._nest(root, trace.model_name, _MODEL_SPAN, stamps, attributes)
        _add_events(root, stamps, _ROOT_EVENTS)
        root.end(end_time=stamps[-1][1])

    def _nest(
        self,
        parent: Any,
        name: str,
        layout: _Layout,
        stamps: list[tuple[str, int]],
        attributes: dict[str, Any],
    ) -> None:
        """A child span from ``layout``'s start to end timestamp (skipped when either is missing)."""
        from opentelemetry import trace as otel_trace

        times = dict(reversed(stamps))  # first occurrence of each name
        start, end = times.get(layout.start), times.get(layout.end)
        if start is None or end is None:
            return
        context = otel_trace.set_span_in_context(parent)
        span = self.tracer.start_span(name, context=context, start_time=start, attributes=attributes)
        _add_events(span, stamps, layout.events)
        if layout.child is not None:
            self._nest(span, "compute", layout.child, stamps, attributes)
        span.end(end_time=end)

    def close(self) -> None:
        self.provider.shutdown()  # flushes the batch processor


@hookimpl
def pagedserve_trace_exporters() -> list[type[TraceExporter]]:
    return [OpenTelemetryTraceExporter]
