"""Per model-version counters and cumulative durations, shaped like Triton's ModelStatistics."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        if ns > 0:
            self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ResponseDurations:
    """Per response index of decoupled models (Triton's ``response_stats``)."""

    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    empty_response: Duration = field(default_factory=Duration)
    cancel: Duration = field(default_factory=Duration)


@dataclass
class StatsSnapshot:
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: dict[int, BatchDurations]
    responses: dict[int, ResponseDurations]
    fail_reasons: dict[str, int] = field(default_factory=dict)


class ModelStats:
    """Thread-safe accumulator; the batching layer and responders write, the Statistics RPC reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._fail_reasons: dict[str, int] = defaultdict(int)
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._batches: dict[int, BatchDurations] = defaultdict(BatchDurations)
        self._responses: dict[int, ResponseDurations] = defaultdict(ResponseDurations)

    def record_success(
        self, *, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, batch_size: int
    ) -> None:
        last_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._last_inference_ms = last_ms
            self._inference_count += batch_size
            self._success.add(total_ns)
            self._queue.add(queue_ns)
            self._compute_input.add(input_ns)
            self._compute_infer.add(infer_ns)
            self._compute_output.add(output_ns)

    def record_failure(self, total_ns: int, reason: str = "OTHER") -> None:
        """``reason`` as Triton's failure metric labels it: REJECTED, CANCELED, BACKEND or OTHER."""
        with self._lock:
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._fail.add(total_ns)
            self._fail_reasons[reason] += 1

    def record_execution(self, batch_size: int, *, input_ns: int, infer_ns: int, output_ns: int) -> None:
        with self._lock:
            self._execution_count += 1
            batch = self._batches[batch_size]
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def record_response(self, index: int, *, infer_ns: int, output_ns: int, ok: bool, empty: bool) -> None:
        with self._lock:
            response = self._responses[index]
            if empty:
                response.empty_response.add(infer_ns)
                return
            response.compute_infer.add(infer_ns)
            response.compute_output.add(output_ns)
            (response.success if ok else response.fail).add(infer_ns + output_ns)

    def record_cancel(self, index: int, ns: int) -> None:
        with self._lock:
            self._responses[index].cancel.add(ns)

    def snapshot(self) -> StatsSnapshot:
        def copy(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        with self._lock:
            return StatsSnapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=copy(self._success),
                fail=copy(self._fail),
                queue=copy(self._queue),
                compute_input=copy(self._compute_input),
                compute_infer=copy(self._compute_infer),
                compute_output=copy(self._compute_output),
                batches={
                    size: BatchDurations(copy(b.compute_input), copy(b.compute_infer), copy(b.compute_output))
                    for size, b in sorted(self._batches.items())
                },
                fail_reasons=dict(self._fail_reasons),
                responses={
                    i: ResponseDurations(
                        *(copy(getattr(r, f)) for f in ResponseDurations.__dataclass_fields__)
                    )
                    for i, r in sorted(self._responses.items())
                },
            )
