"""ModelStats: records from many threads, read at any moment, add up exactly (the hot-path records
wait in a list until a read or a fold adds them up)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
from pagedserve import statistics
from pagedserve.statistics import Duration, ModelStats


def _record(stats: ModelStats, count: int) -> None:
    for _ in range(count):
        stats.record_success(total_ns=5, queue_ns=1, input_ns=1, infer_ns=2, output_ns=1, batch_size=2)
        stats.record_execution(2, input_ns=1, infer_ns=2, output_ns=0)
        stats.record_response(0, infer_ns=2, output_ns=1, ok=True, empty=False)


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Threads switch every microsecond instead of every 5 ms, so that races show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_concurrent_records_and_reads_add_up_exactly() -> None:
    stats = ModelStats()
    threads = [threading.Thread(target=_record, args=(stats, 3000)) for _ in range(4)]
    reads: list[int] = []
    reader = threading.Thread(
        target=lambda: [reads.append(stats.snapshot().success.count) for _ in range(200)]
    )
    for thread in [*threads, reader]:
        thread.start()
    for thread in [*threads, reader]:
        thread.join()
    snap = stats.snapshot()
    assert snap.success.count == 12000 and snap.success.ns == 60000
    assert snap.inference_count == 24000 and snap.execution_count == 12000
    assert snap.batches[2].compute_infer.ns == 24000
    assert snap.responses[0].success.count == 12000 and snap.responses[0].success.ns == 36000
    assert reads == sorted(reads)  # a read never loses what an earlier read saw


def test_pending_records_stay_bounded_without_reads() -> None:
    stats = ModelStats()
    _record(stats, statistics._FOLD_AT * 3)
    for pending in (stats._successes, stats._executions, stats._response_records):
        assert len(pending) < statistics._FOLD_AT


def test_a_failure_after_a_success_keeps_the_latest_inference_time() -> None:
    stats = ModelStats()
    stats.record_success(total_ns=1, queue_ns=0, input_ns=0, infer_ns=1, output_ns=0, batch_size=1)
    stats.record_failure(10, "BACKEND")
    snap = stats.snapshot()
    assert snap.success.count == 1 and snap.fail.count == 1 and snap.fail_reasons == {"BACKEND": 1}
    assert snap.last_inference_ms > 0


def test_a_record_appended_while_a_read_folds_is_kept() -> None:
    """A writer may hold the pending list when a read folds it (it appends without the lock)."""
    stats = ModelStats()
    pending = stats._executions
    stats.snapshot()
    pending.append((1, 0, 0, 0))
    assert stats.snapshot().execution_count == 1


def test_folded_sums_are_the_per_record_sums() -> None:
    """Each duration counts every record and sums only its positive values, grouped by batch size
    and by response index and outcome, as adding record by record does."""
    stats = ModelStats()
    successes = [(5, 0, 1, 2, 1, 1), (7, -3, 2, 0, 4, 2), (0, 1, 1, 1, 1, 4)]
    for total, queue, input_ns, infer, output, batch in successes:
        stats.record_success(
            total_ns=total,
            queue_ns=queue,
            input_ns=input_ns,
            infer_ns=infer,
            output_ns=output,
            batch_size=batch,
        )
    for size, infer in [(1, 3), (2, 5), (1, -1), (4, 0)]:
        stats.record_execution(size, input_ns=1, infer_ns=infer, output_ns=2)
    responses = [
        (0, 3, 1, True, False),
        (0, 2, 2, False, False),
        (1, 4, 0, True, False),
        (1, 6, 0, True, True),
    ]
    for index, infer, output, ok, empty in responses:
        stats.record_response(index, infer_ns=infer, output_ns=output, ok=ok, empty=empty)
    snap = stats.snapshot()

    def expected(values: list[int]) -> tuple[int, int]:
        return len(values), sum(v for v in values if v > 0)

    def got(duration: Duration) -> tuple[int, int]:
        return duration.count, duration.ns

    assert got(snap.success) == expected([r[0] for r in successes])
    assert got(snap.queue) == expected([r[1] for r in successes])
    assert got(snap.compute_infer) == expected([r[3] for r in successes])
    assert snap.inference_count == 7 and snap.execution_count == 4
    assert got(snap.batches[1].compute_infer) == expected([3, -1])
    assert got(snap.batches[2].compute_output) == expected([2])
    assert got(snap.batches[4].compute_infer) == expected([0])
    assert got(snap.responses[0].success) == expected([4]) and got(snap.responses[0].fail) == expected([4])
    assert got(snap.responses[1].success) == expected([4]) and got(snap.responses[1].empty_response) == (1, 6)
    assert got(snap.responses[0].compute_infer) == expected([3, 2])
