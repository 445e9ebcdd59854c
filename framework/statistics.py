"""Per model-version counters and cumulative durations, shaped like Triton's ModelStatistics."""

from __future__ import annotations

import operator
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
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

    def add_all(self, durations: Iterable[int]) -> None:
        """:meth:`add` of each, summed in C."""
        values = list(durations)
        self.count += len(values)
        self.ns += sum(filter(_POSITIVE, values))


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


# Records of the hot paths wait in lists and are added up at the next read, or once this many wait:
# an append per record, and a fold that sums each field over many records in C, where taking the
# lock and adding up to five durations per record was a measurable share of a cheap model's request.
_FOLD_AT = 512
_POSITIVE = (0).__lt__


def _take_all(pending: list[Any]) -> list[Any]:
    """What waits in ``pending``, by count, never by swapping the list: a writer appends without the
    lock, so a record appended meanwhile stays for the next fold."""
    count = len(pending)
    records = pending[:count]
    del pending[:count]
    return records


def _grouped(records: list[tuple[Any, ...]], width: int) -> dict[tuple[Any, ...], list[tuple[Any, ...]]]:
    """Records by their first ``width`` fields."""
    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = defaultdict(list)
    for record in records:
        groups[record[:width]].append(record[width:])
    return groups


class ModelStats:
    """Thread-safe accumulator; the batching layer and responders write, the Statistics RPC reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (time, total, queue, input, infer, output ns, batch size)
        self._successes: list[tuple[int, int, int, int, int, int, int]] = []
        # (batch size, input, infer, output ns)
        self._executions: list[tuple[int, int, int, int]] = []
        # (response index, ok, empty, infer, output ns)
        self._response_records: list[tuple[int, bool, bool, int, int]] = []
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
        record = (time.time_ns(), total_ns, queue_ns, input_ns, infer_ns, output_ns, batch_size)
        self._defer(self._successes, record)

    def record_failure(self, total_ns: int, reason: str = "OTHER") -> None:
        """``reason`` as Triton's failure metric labels it: REJECTED, CANCELED, BACKEND or OTHER."""
        with self._lock:
            self._fold()
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._fail.add(total_ns)
            self._fail_reasons[reason] += 1

    def record_execution(self, batch_size: int, *, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self._defer(self._executions, (batch_size, input_ns, infer_ns, output_ns))

    def record_response(self, index: int, *, infer_ns: int, output_ns: int, ok: bool, empty: bool) -> None:
        self._defer(self._response_records, (index, ok, empty, infer_ns, output_ns))

    def record_cancel(self, index: int, ns: int) -> None:
        with self._lock:
            self._responses[index].cancel.add(ns)

    def _defer(self, pending: list[Any], record: tuple[Any, ...]) -> None:
        pending.append(record)
        if len(pending) >= _FOLD_AT:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        """With the lock held: adds up every waiting record."""
        successes = _take_all(self._successes)
        if successes:
            times, totals, queues, inputs, infers, outputs, batches = zip(*successes, strict=True)
            self._last_inference_ms = max(self._last_inference_ms, max(times) // 1_000_000)
            self._inference_count += sum(batches)
            self._success.add_all(totals)
            self._queue.add_all(queues)
            self._compute_input.add_all(inputs)
            self._compute_infer.add_all(infers)
            self._compute_output.add_all(outputs)
        for (size,), records in _grouped(_take_all(self._executions), 1).items():
            inputs, infers, outputs = zip(*records, strict=True)
            self._execution_count += len(records)
            batch = self._batches[size]
            batch.compute_input.add_all(inputs)
            batch.compute_infer.add_all(infers)
            batch.compute_output.add_all(outputs)
        for (index, ok, empty), records in _grouped(_take_all(self._response_records), 3).items():
            response = self._responses[index]
            infers, outputs = zip(*records, strict=True)
            if empty:
                response.empty_response.add_all(infers)
                continue
            response.compute_infer.add_all(infers)
            response.compute_output.add_all(outputs)
            (response.success if ok else response.fail).add_all(map(operator.add, infers, outputs))

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
