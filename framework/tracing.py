"""Request tracing: Triton's trace settings (global and per model), sampling, and the exporter seam.

:class:`TraceSettings` holds what TraceSetting reads and writes, with Triton's validation texts and
clearing rules. :class:`Tracer` decides per request whether to trace (level, rate, count) and hands
finished :class:`Trace` records to the selected :class:`TraceExporter` on a background thread, so
writing files or spans never runs on the event loop. Exporters come from plugins
(``pagedserve_trace_exporters``); this module knows nothing about files, OpenTelemetry or protobuf.
"""

from __future__ import annotations

import abc
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pagedserve.config import TracingConfig
from pagedserve.errors import InferenceError

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency")


# -- what a trace records ---------------------------------------------------------------------------


@dataclass
class TensorRecord:
    """One tensor captured at ``TENSORS`` level (Triton's TENSOR_QUEUE_INPUT / TENSOR_BACKEND_OUTPUT)."""

    activity: str
    name: str
    datatype: str
    shape: list[int]
    data: str


@dataclass
class Trace:
    """The timeline of one traced request. Timestamps are ``time.monotonic_ns()`` values (Triton uses a
    steady clock too); ``epoch_offset_ns`` turns them into wall-clock time for exporters that need it."""

    id: int
    model_name: str
    model_version: int
    request_id: str
    levels: frozenset[str]
    log_frequency: int
    timestamps: list[tuple[str, int]] = field(default_factory=list)
    tensors: list[TensorRecord] = field(default_factory=list)
    epoch_offset_ns: int = field(default_factory=lambda: time.time_ns() - time.monotonic_ns())
    _sink: Tracer | None = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)

    def mark(self, name: str, ns: int | None = None) -> None:
        self.timestamps.append((name, time.monotonic_ns() if ns is None else ns))

    @property
    def wants_tensors(self) -> bool:
        return "TENSORS" in self.levels

    def record_tensor(self, activity: str, name: str, datatype: str, array: np.ndarray) -> None:
        if self.wants_tensors:
            self.tensors.append(TensorRecord(activity, name, datatype, list(array.shape), _flat(array)))

    def finish(self) -> None:
        """Hand the trace to the exporter; later calls do nothing."""
        if self._done:
            return
        self._done = True
        if self._sink is not None:
            self._sink.submit(self)

    def first(self, name: str) -> int | None:
        return next((ns for n, ns in self.timestamps if n == name), None)


def _flat(array: np.ndarray) -> str:
    values = np.asarray(array).reshape(-1)
    if values.dtype == np.object_:
        return ",".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
    return ",".join(str(v) for v in values.tolist())


class TraceExporter(abc.ABC):
    """Receives finished traces (one thread calls it, in order). Implementations come from the
    ``pagedserve_trace_exporters`` hook and are selected by ``tracing.mode``."""

    name: ClassVar[str]
    writes_file: ClassVar[bool] = False
    """True when ``trace_file`` and ``log_frequency`` apply (they then show in TraceSetting)."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def export(self, trace: Trace) -> None:
        """Record one finished trace."""

    def mode_settings(self) -> dict[str, list[str]]:
        """Mode-specific, read-only settings to show in TraceSetting responses."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional for exporters with nothing to flush
        """Flush what is pending; called once at shutdown."""


# -- settings ----------------------------------------------------------------------------------------


@dataclass
class _Scope:
    """A settings layer (global, or one model's overrides) with the counters of what it owns."""

    values: dict[str, Any] = field(default_factory=dict)
    seen: int = 0
    """Requests counted towards ``trace_rate`` (when this scope sets the rate)."""
    remaining: int = -1
    """Traces left to collect (when this scope sets the count); -1 = no limit."""


class TraceSettings:
    """Global and per-model trace settings with Triton's semantics: a model follows the global value
    of every key it has not set; clearing a model key returns it to following global; clearing a global
    key restores the start-up value."""

    def __init__(self, config: TracingConfig) -> None:
        self.file = config.file
        self.mode = config.mode
        self._startup: dict[str, Any] = {
            "trace_level": frozenset(level for level in config.level if level != "OFF"),
            "trace_rate": config.rate,
            "trace_count": config.count,
            "log_frequency": config.log_frequency,
        }
        self._global = _Scope(dict(self._startup), remaining=config.count)
        self._models: dict[str, _Scope] = {}
        self.lock = threading.Lock()

    @property
    def maybe_active(self) -> bool:
        """False only when nothing can be traced (checked without the lock on every request)."""
        return bool(self._global.values["trace_level"]) or bool(self._models)

    def _owner(self, model: str, key: str) -> _Scope:
        scope = self._models.get(model)
        return scope if scope is not None and key in scope.values else self._global

    def value(self, model: str, key: str) -> Any:
        owner = self._owner(model, key)
        return owner.remaining if key == "trace_count" else owner.values[key]

    def update(self, model: str, changes: dict[str, list[str]]) -> None:
        """Apply a TraceSetting update (validated as a whole first, as Triton does)."""
        parsed = _parse_changes(changes)
        with self.lock:
            scope = self._global if not model else self._models.setdefault(model, _Scope())
            for key, new in parsed.items():
                self._apply(scope, key, new)
            if scope is not self._global and not scope.values:
                del self._models[model]  # follows global entirely again: keep the fast path

    def _apply(self, scope: _Scope, key: str, new: Any) -> None:
        if new is None:  # cleared
            if scope is self._global:
                scope.values[key] = self._startup[key]
            else:
                scope.values.pop(key, None)
        else:
            scope.values[key] = new
        if key == "trace_count" and key in scope.values:
            scope.remaining = scope.values[key]
        if key == "trace_rate":
            scope.seen = 0

    def render(self, model: str, exporter: TraceExporter | None) -> dict[str, list[str]]:
        """The full settings as TraceSetting returns them."""
        with self.lock:
            levels = self.value(model, "trace_level")
            out = {
                "trace_level": [lv for lv in ("TIMESTAMPS", "TENSORS") if lv in levels] or ["OFF"],
                "trace_rate": [str(self.value(model, "trace_rate"))],
                "trace_count": [str(self.value(model, "trace_count"))],
            }
            if exporter is None or exporter.writes_file:
                out["log_frequency"] = [str(self.value(model, "log_frequency"))]
                out["trace_file"] = [self.file]
        out["trace_mode"] = [self.mode]
        if exporter is not None:
            out.update(exporter.mode_settings())
        return out

    def take(self, model: str) -> tuple[frozenset[str], int] | None:
        """Count one request of ``model``; its levels and log frequency if it is to be traced."""
        with self.lock:
            levels = self.value(model, "trace_level")
            if not levels:
                return None
            rate_owner = self._owner(model, "trace_rate")
            rate = rate_owner.values["trace_rate"]
            rate_owner.seen += 1
            if rate == 0 or rate_owner.seen % rate:
                return None
            count_owner = self._owner(model, "trace_count")
            if count_owner.remaining == 0:
                return None
            if count_owner.remaining > 0:
                count_owner.remaining -= 1
            return levels, self.value(model, "log_frequency")


def _parse_changes(changes: dict[str, list[str]]) -> dict[str, Any]:
    """Triton's checks and texts; ``None`` values clear a key. Unknown keys are ignored."""
    if "trace_file" in changes:
        raise InferenceError.unimplemented("trace file location can not be updated through network protocol")
    parsed: dict[str, Any] = {}
    if "trace_level" in changes:
        levels = changes["trace_level"]
        if not levels:
            parsed["trace_level"] = None
        elif "OFF" in levels and len(levels) > 1:
            raise InferenceError("Expect only one trace level 'OFF' is specified")
        else:
            known = [lv for lv in levels if lv in ("OFF", "TIMESTAMPS", "TENSORS")]
            if known:  # like Triton, unknown level names change nothing
                parsed["trace_level"] = frozenset(lv for lv in known if lv != "OFF")
    bounds = {
        "trace_rate": (0, _UINT32_MAX),
        "trace_count": (-1, _INT32_MAX),
        "log_frequency": (0, _UINT32_MAX),
    }
    for key, (low, high) in bounds.items():
        if key in changes:
            parsed[key] = _parse_int(key, changes[key], low, high)
    return parsed


def _parse_int(key: str, values: list[str], low: int, high: int) -> int | None:
    if not values:
        return None
    if len(values) > 1:
        raise InferenceError(f"expect only 1 value for '{key}'")
    text = values[0]
    number = _leading_int(text)
    if number is None:
        raise InferenceError(f"Unable to parse '{key}', got: {text}")
    if key == "trace_count" and number < low:
        raise InferenceError(f"Unable to parse '{key}'. Expecting value >= {low}, got: {text}")
    if not low <= number <= high:
        raise InferenceError(f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {text}")
    return number


def _leading_int(text: str) -> int | None:
    """What C++ ``std::stoi`` reads: optional spaces and sign, then digits; the rest is ignored."""
    stripped = text.lstrip()
    digits = 1 if stripped[:1] in ("+", "-") else 0
    while digits < len(stripped) and stripped[digits].isdigit():
        digits += 1
    head = stripped[:digits]
    return int(head) if head and head not in ("+", "-") else None


# -- the tracer -----------------------------------------------------------------------------------


class Tracer:
    """Samples requests into traces and exports finished ones on its own thread."""

    def __init__(self, settings: TraceSettings, exporter: TraceExporter | None) -> None:
        self.settings = settings
        self.exporter = exporter
        self._ids = itertools.count(1)
        self._queue: queue.Queue[Trace | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if exporter is not None:
            self._thread = threading.Thread(target=self._run, name="pagedserve-trace", daemon=True)
            self._thread.start()

    def start(self, model_name: str, model_version: int, request_id: str, arrival_ns: int) -> Trace | None:
        """A new trace for this request, or None (the common case, decided without locking when tracing
        is off)."""
        if self.exporter is None or not self.settings.maybe_active:
            return None
        taken = self.settings.take(model_name)
        if taken is None:
            return None
        levels, log_frequency = taken
        trace = Trace(next(self._ids), model_name, model_version, request_id, levels, log_frequency)
        trace._sink = self
        for name in ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "REQUEST_START"):
            trace.mark(name, arrival_ns)
        return trace

    def submit(self, trace: Trace) -> None:
        self._queue.put(trace)

    def _run(self) -> None:
        assert self.exporter is not None
        while (trace := self._queue.get()) is not None:
            try:
                self.exporter.export(trace)
            except Exception:  # noqa: BLE001 - a broken exporter must not stop tracing of later requests
                log.exception("trace exporter '%s' failed", self.exporter.name)

    def close(self) -> None:
        if self._thread is None or self.exporter is None:
            return
        self._queue.put(None)
        self._thread.join(10)
        self._thread = None
        self.exporter.close()
