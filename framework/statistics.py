"""Per model-version counters and cumulative durations, shaped like Triton's ModelStatistics."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


# Records of the hot paths wait in a list and are added up at the next read, or once this many wait:
# appending is one atomic list operation, where taking the lock and adding up to five durations per
# call was a measurable share of a cheap model's request.
_FOLD_AT = 512


class ModelStats:
    """Thread-safe accumulator; the batching layer and responders write, the Statistics RPC reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
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
        self._defer(
            self._add_success, (time.time_ns(), total_ns, queue_ns, input_ns, infer_ns, output_ns, batch_size)
        )

    def record_failure(self, total_ns: int, reason: str = "OTHER") -> None:
        """``reason`` as Triton's failure metric labels it: REJECTED, CANCELED, BACKEND or OTHER."""
        with self._lock:
            self._fold()
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._fail.add(total_ns)
            self._fail_reasons[reason] += 1

    def record_execution(self, batch_size: int, *, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self._defer(self._add_execution, (batch_size, input_ns, infer_ns, output_ns))

    def record_response(self, index: int, *, infer_ns: int, output_ns: int, ok: bool, empty: bool) -> None:
        self._defer(self._add_response, (index, infer_ns, output_ns, ok, empty))

    def record_cancel(self, index: int, ns: int) -> None:
        with self._lock:
            self._responses[index].cancel.add(ns)

    def _defer(self, add: Callable[..., None], record: tuple[Any, ...]) -> None:
        pending = self._pending
        pending.append((add, record))
        if len(pending) >= _FOLD_AT:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        """With the lock held. Takes what waits by count, never by swapping the list: a record
        appended meanwhile (another thread, no lock) stays for the next fold."""
        pending = self._pending
        count = len(pending)
        records = pending[:count]
        del pending[:count]
        for add, record in records:
            add(*record)

    def _add_success(
        self,
        time_ns: int,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        batch: int,
    ) -> None:
        self._last_inference_ms = max(self._last_inference_ms, time_ns // 1_000_000)
        self._inference_count += batch
        self._success.add(total_ns)
        self._queue.add(queue_ns)
        self._compute_input.add(input_ns)
        self._compute_infer.add(infer_ns)
        self._compute_output.add(output_ns)

    def _add_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self._execution_count += 1
        batch = self._batches[batch_size]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def _add_response(self, index: int, infer_ns: int, output_ns: int, ok: bool, empty: bool) -> None:
        response = self._responses[index]
        if empty:
            response.empty_response.add(infer_ns)
            return
        response.compute_infer.add(infer_ns)
        response.compute_output.add(output_ns)
        (response.success if ok else response.fail).add(infer_ns + output_ns)

    def snapshot(self) -> StatsSnapshot:
        def copy(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        with self._lock:
            self._fold()
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
