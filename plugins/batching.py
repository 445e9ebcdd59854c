"""Built-in batching policies ``direct`` and ``dynamic`` (Triton's dynamic batcher), and the worker
base they share with ``sequence`` (:mod:`pagedserve_plugins.sequence_batching`).

Every policy runs one worker thread per model instance (``instance_group`` counts). Workers form their
own batches under one condition variable, so a request goes from ``submit`` to ``execute`` without an
extra thread hop. This module knows nothing about the wire: it only sees decoded requests and answers
errors through each request's responder.

A model whose ``execute`` takes microseconds may say so with the config parameter
``execute_on_loop: "true"`` (direct and dynamic policies, no queue delay): it then has no worker
thread; the batches of requests from the server's event loop run on that loop, those of requests
from other threads (BLS calls, ensemble steps) in the submitting thread, one batch at a time.
Waking a worker and waking the loop again for its answer cost more than such a model's whole
execute (see docs/benchmarks.md).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import grpc
from pagedserve.backend import Model, ModelSpec, instance_count
from pagedserve.batching import BatchingPolicy
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.inference import InferenceRequest
from pagedserve.statistics import ModelStats

log = logging.getLogger(__name__)

NS_PER_US = 1_000


def fail_requests(requests: Iterable[InferenceRequest], error: InferenceError) -> None:
    """Send ``error`` as the final response of every request that has not finished yet."""
    for request in requests:
        request.responder.fail(error)


def _error_from(exception: Exception) -> InferenceError:
    if isinstance(exception, InferenceError):
        return exception
    return InferenceError.internal(str(exception) or type(exception).__name__)


@dataclass
class Take:
    """One planning step of a worker: a batch to run, requests to reject, or a time to wake up."""

    batch: list[InferenceRequest] = field(default_factory=list)
    rejected: list[tuple[InferenceRequest, InferenceError]] = field(default_factory=list)
    wake_at_ns: int | None = None
    done: bool = False


class WorkerPolicy(BatchingPolicy, abc.ABC):
    """Worker threads plus the shared bookkeeping; subclasses decide what a worker runs next."""

    runs_on_loop_ok: ClassVar[bool] = False
    """Whether ``execute_on_loop`` may drive this policy (it never waits for more requests). There, a
    request that finds the queue idle (``_has_queued`` False) and nothing else in the loop's turn runs
    at once without being enqueued: it would have been the whole of the next batch."""

    def __init__(self, model: Model, spec: ModelSpec, stats: ModelStats) -> None:
        super().__init__(model, spec, stats)
        # Hot paths take the lock itself: ``with`` on the Condition adds two Python calls.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._on_loop = spec.parameter("execute_on_loop", "false") == "true"
        if self._on_loop and not self.runs_on_loop_ok:
            raise ValueError(f"execute_on_loop is not supported by the '{self.name}' batching policy")
        self._draining = False
        """A drain is scheduled or running (loop mode): it alone executes, until the queue is empty."""

    def _start(self) -> None:
        """Called by subclasses once their queue state exists."""
        if self._on_loop:
            return
        for index in range(instance_count(self.spec)):
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"{self.spec.name}-{self.name}-{index}", daemon=True
            )
            self._workers.append(thread)
            thread.start()

    # -- what subclasses provide (always called with self._cond held) -----------------------------

    @abc.abstractmethod
    def _enqueue(self, request: InferenceRequest, now_ns: int) -> None:
        """Queue an accepted request; raise InferenceError to reject it."""

    @abc.abstractmethod
    def _take(self, instance: int, now_ns: int) -> Take:
        """Pick the next batch for ``instance``; ``done`` once closing and nothing is left."""

    def _finished(self, instance: int, batch: list[InferenceRequest]) -> None:
        """Bookkeeping after a batch ran."""

    def _prepare(self, batch: list[InferenceRequest]) -> None:
        """Last changes to the requests before execute, outside the lock (control tensors...)."""

    def _has_queued(self) -> bool:
        """Whether requests wait in the queue (loop mode stops draining when none do)."""
        return True

    # -- public API -------------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> None:
        loop = _serving_loop(request) if self._on_loop else None
        # Nothing else waits in the loop's turn: a drain would run next, and no other request could
        # join its batch first, so it runs now and saves the loop turns to it and back.
        now = loop is not None and _nothing_else_ready(loop)
        with self._lock:
            if self._closing:
                raise InferenceError.unavailable(
                    f"Request for unknown model: '{self.spec.name}' version {request.model_version} "
                    "is not at ready state"
                )
            # An idle queue's next batch would be this request alone: it runs without an entry.
            alone = now and not self._draining and not self._has_queued()
            if not alone:
                self._enqueue(request, time.monotonic_ns())
                if not self._on_loop:
                    self._cond.notify_all()
                    return
                if self._draining:
                    return  # the drain under way takes it
            self._draining = True
        if alone:
            self._run([request])
            self._ran(loop, [request])
        elif loop is not None:
            if now:
                self._drain_step(loop)
            else:
                loop.call_soon(self._drain_step, loop)
        else:
            self._drain_here()

    def _drain_here(self) -> None:
        """Drain on this thread (a request from outside the server's loop: BLS, an ensemble step)."""
        try:
            while self._drain_step(None):
                pass
        except BaseException:
            with self._lock:
                self._draining = False  # let the next submit drain what is left
            raise

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._workers:
            thread.join()
        if self._on_loop:
            self._close_loop_mode()

    # -- loop mode --------------------------------------------------------------------------------

    def _drain_step(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Run one batch. On ``loop``, schedule the next one there while work is left (the loop
        serves other calls in between, and what they submit joins the next batch); elsewhere,
        return whether work is left for the caller to go on."""
        with self._lock:
            take = self._take(0, time.monotonic_ns())
            if not take.batch and not take.rejected:
                self._stop_draining()
                return False
        for request, error in take.rejected:
            fail_requests([request], error)
        if take.batch:
            self._run(take.batch)
        return self._ran(loop, take.batch)

    def _ran(self, loop: asyncio.AbstractEventLoop | None, batch: list[InferenceRequest]) -> bool:
        """After a batch of the drain: stop when nothing waits, else schedule the next on ``loop``
        or return True for the caller to go on."""
        with self._lock:
            self._finished(0, batch)
            if not self._has_queued():
                self._stop_draining()
                return False
        if loop is not None:
            loop.call_soon(self._drain_step, loop)
            return False
        return True

    def _stop_draining(self) -> None:
        """With the lock held. Only close() waits for a drain to end, and it sets ``_closing`` first."""
        self._draining = False
        if self._closing:
            self._cond.notify_all()

    def _close_loop_mode(self) -> None:
        """Let a drain under way elsewhere finish (one scheduled on this thread's own loop cannot),
        then run what is left here."""
        with self._cond:
            if _running_loop() is None:
                self._cond.wait_for(lambda: not self._draining, timeout=10)
            self._draining = True
        while self._drain_step(None):
            pass

    # -- workers ----------------------------------------------------------------------------------

    def _work(self, instance: int) -> None:
        while True:
            take = self._wait_for_work(instance)
            for request, error in take.rejected:
                fail_requests([request], error)
            if take.batch:
                self._run(take.batch)
                with self._cond:
                    self._finished(instance, take.batch)
                    self._cond.notify_all()
            elif take.done:
                return
            # Else the finished batch, tensors and all, stays alive while this thread waits.
            del take

    def _wait_for_work(self, instance: int) -> Take:
        with self._cond:
            while True:
                take = self._take(instance, time.monotonic_ns())
                if take.batch or take.rejected or take.done:
                    return take
                timeout = None
                if take.wake_at_ns is not None:
                    timeout = max(take.wake_at_ns - time.monotonic_ns(), 0) / 1e9
                self._cond.wait(timeout)

    def _run(self, batch: list[InferenceRequest]) -> None:
        cancelled = [r.responder.cancelled for r in batch]
        if any(cancelled):
            dropped = [r for r, c in zip(batch, cancelled, strict=True) if c]
            fail_requests(dropped, InferenceError("Request was cancelled", grpc.StatusCode.CANCELLED))
            batch = [r for r, c in zip(batch, cancelled, strict=True) if not c]
            if not batch:
                return
        prepare_start = time.monotonic_ns()
        try:
            self._prepare(batch)
        except Exception as error:  # noqa: BLE001 - a request the policy cannot complete
            fail_requests(batch, _error_from(error))
            return
        start = time.monotonic_ns()
        input_ns = start - prepare_start
        for request in batch:
            input_ns += request.timing.compute_input_ns
            request.timing.compute_start_ns = start
        try:
            self.model.execute(batch)
        except Exception as error:  # noqa: BLE001 - every model failure becomes the batch's answer
            self._stamp_end(batch)
            log.debug("%s: execute failed: %s", self.spec.name, error, exc_info=True)
            fail_requests(batch, _error_from(error))
            return
        end = self._stamp_end(batch)
        self.stats.record_execution(
            sum(r.batch_size for r in batch), input_ns=input_ns, infer_ns=end - start, output_ns=0
        )

    @staticmethod
    def _stamp_end(batch: list[InferenceRequest]) -> int:
        end = time.monotonic_ns()
        for request in batch:
            if not request.timing.compute_end_ns:
                request.timing.compute_end_ns = end
        return end


class DirectPolicy(WorkerPolicy):
    """No batching: each request is executed alone, in arrival order, by the next free instance."""

    name: ClassVar[str] = "direct"
    runs_on_loop_ok: ClassVar[bool] = True

    def __init__(self, model: Model, spec: ModelSpec, stats: ModelStats) -> None:
        super().__init__(model, spec, stats)
        self._queue: deque[InferenceRequest] = deque()
        self._start()

    def _enqueue(self, request: InferenceRequest, now_ns: int) -> None:
        self._queue.append(request)

    def _take(self, instance: int, now_ns: int) -> Take:
        if self._queue:
            return Take(batch=[self._queue.popleft()])
        return Take(done=self._closing)

    def _has_queued(self) -> bool:
        return bool(self._queue)


@dataclass
class _QueuedRequest:
    request: InferenceRequest
    enqueued_ns: int
    deadline_ns: int = 0
    """Monotonic time after which the request times out in the queue; 0 = never."""


@dataclass(frozen=True)
class _QueuePolicy:
    """One priority level's ``ModelQueuePolicy``."""

    max_size: int = 0
    default_timeout_us: int = 0
    allow_override: bool = False
    delay_on_timeout: bool = False

    def deadline_ns(self, request: InferenceRequest, now_ns: int) -> int:
        timeout_us = self.default_timeout_us
        # A request may only shorten the model's timeout (0 = no timeout, so any request value counts).
        if (
            self.allow_override
            and request.timeout_us > 0
            and (timeout_us == 0 or request.timeout_us < timeout_us)
        ):
            timeout_us = request.timeout_us
        return now_ns + timeout_us * NS_PER_US if timeout_us else 0


class DynamicPolicy(WorkerPolicy):
    """Triton's dynamic batcher: batches up to ``max_batch_size`` with preferred sizes, a queue delay,
    priority levels and per-level queue policies (size limit, timeouts)."""

    name: ClassVar[str] = "dynamic"
    runs_on_loop_ok: ClassVar[bool] = True

    def __init__(self, model: Model, spec: ModelSpec, stats: ModelStats) -> None:
        super().__init__(model, spec, stats)
        config = spec.config.dynamic_batching
        self._max_size = max(spec.config.max_batch_size, 1)
        self._preferred = sorted({size for size in config.preferred_batch_size if 0 < size <= self._max_size})
        self._max_preferred = self._preferred[-1] if self._preferred else self._max_size
        self._delay_ns = config.max_queue_delay_microseconds * NS_PER_US
        self._levels = max(config.priority_levels, 1)
        self._default_level = self._check_default_level(config.priority_levels, config.default_priority_level)
        self._policies = [self._queue_policy(level) for level in range(1, self._levels + 1)]
        self._queues: list[deque[_QueuedRequest]] = [deque() for _ in range(self._levels)]
        # Per level, as Triton's: requests whose timeout passed under timeout_action DELAY. They run
        # after that level's other requests and still count towards its max_queue_size.
        self._delayed: list[deque[_QueuedRequest]] = [deque() for _ in range(self._levels)]
        self._with_deadline = 0
        if self._on_loop and self._delay_ns:
            raise ValueError("execute_on_loop needs dynamic_batching.max_queue_delay_microseconds 0")
        self._start()

    @staticmethod
    def _check_default_level(levels: int, default: int) -> int:
        if levels == 0:
            return 1
        if not 1 <= default <= levels:
            raise ValueError(
                f"dynamic_batching.default_priority_level must be in [1, {levels}] when priority_levels "
                f"is {levels}, got {default}"
            )
        return default

    def _queue_policy(self, level: int) -> _QueuePolicy:
        config = self.spec.config.dynamic_batching
        source = config.priority_queue_policy.get(level, config.default_queue_policy)
        return _QueuePolicy(
            max_size=source.max_queue_size,
            default_timeout_us=source.default_timeout_microseconds,
            allow_override=source.allow_timeout_override,
            delay_on_timeout=source.timeout_action == type(source).DELAY,
        )

    def level_of(self, request: InferenceRequest) -> int:
        """Priority level (1 = highest); 0 or out of range means the default level, as in Triton."""
        priority = request.priority
        if priority <= 0 or priority > self._levels:
            return self._default_level
        return priority

    def _enqueue(self, request: InferenceRequest, now_ns: int) -> None:
        index = self.level_of(request) - 1
        policy = self._policies[index]
        queue = self._queues[index]
        if policy.max_size and len(queue) + len(self._delayed[index]) >= policy.max_size:
            raise InferenceError.unavailable(
                f"[request id: {request.id or '<id_unknown>'}] Exceeds maximum queue size"
            )
        entry = _QueuedRequest(request, now_ns, policy.deadline_ns(request, now_ns))
        self._with_deadline += bool(entry.deadline_ns)
        queue.append(entry)

    def _entries(self) -> Iterable[_QueuedRequest]:
        """Queued requests in the order they run: by level, each level's delayed ones last."""
        if self._levels == 1 and not self._delayed[0]:
            return self._queues[0]  # the usual case, without a generator per batch
        return self._all_entries()

    def _all_entries(self) -> Iterator[_QueuedRequest]:
        for queue, delayed in zip(self._queues, self._delayed, strict=True):
            yield from queue
            yield from delayed

    def _expire(self, now_ns: int) -> list[tuple[InferenceRequest, InferenceError]]:
        if not self._with_deadline:
            return []
        rejected: list[tuple[InferenceRequest, InferenceError]] = []
        for queue, delayed, policy in zip(self._queues, self._delayed, self._policies, strict=True):
            keep: deque[_QueuedRequest] = deque()
            for entry in queue:
                if not entry.deadline_ns or entry.deadline_ns > now_ns:
                    keep.append(entry)
                    continue
                self._with_deadline -= 1
                entry.deadline_ns = 0
                if policy.delay_on_timeout:
                    delayed.append(entry)
                else:
                    rejected.append((entry.request, InferenceError.unavailable("Request timeout expired")))
            queue.clear()
            queue.extend(keep)
        return rejected

    def _has_queued(self) -> bool:
        return any(self._queues) or any(self._delayed)

    def _next_deadline(self) -> int | None:
        if not self._with_deadline:
            return None
        return min((e.deadline_ns for e in self._entries() if e.deadline_ns), default=None)

    def _take(self, instance: int, now_ns: int) -> Take:
        rejected = self._expire(now_ns)
        count, wait_until = self._plan(now_ns)
        if count:
            return Take(batch=self._pop(count), rejected=rejected)
        wake = [t for t in (wait_until, self._next_deadline()) if t is not None]
        idle = not any(self._queues) and not any(self._delayed)
        return Take(rejected=rejected, wake_at_ns=min(wake) if wake else None, done=self._closing and idle)

    def _plan(self, now_ns: int) -> tuple[int, int | None]:
        """How many queued requests (in priority order) to run now, or when to look again."""
        sizes: list[int] = []
        total = 0
        oldest = None
        best = 0  # request count of the largest prefix whose batch size is a preferred size
        overflow = False
        for entry in self._entries():
            if total + entry.request.batch_size > self._max_size:
                overflow = True
                break
            total += entry.request.batch_size
            sizes.append(total)
            oldest = entry.enqueued_ns if oldest is None else min(oldest, entry.enqueued_ns)
            if total in self._preferred:
                best = len(sizes)
        if not sizes:
            return 0, None
        # Like Triton: a preferred size is cut out once more is queued than the largest preferred size.
        if best and (overflow or total > self._max_preferred):
            return best, None
        if overflow or total >= self._max_preferred or self._closing or not self._delay_ns:
            return len(sizes), None
        assert oldest is not None
        due = oldest + self._delay_ns
        return (len(sizes), None) if now_ns >= due else (0, due)

    def _pop(self, count: int) -> list[InferenceRequest]:
        batch: list[InferenceRequest] = []
        for level in zip(self._queues, self._delayed, strict=True):
            for queue in level:
                while queue and len(batch) < count:
                    entry = queue.popleft()
                    self._with_deadline -= bool(entry.deadline_ns)
                    batch.append(entry.request)
        return batch


def _serving_loop(request: InferenceRequest) -> asyncio.AbstractEventLoop | None:
    """The server's event loop, when ``request`` was submitted on it (its batch then runs there);
    None for a request from any other thread (BLS, ensemble steps), whose batch runs in that thread."""
    loop = getattr(request.responder, "event_loop", None)
    return loop if loop is not None and _running_loop() is loop else None


def _nothing_else_ready(loop: asyncio.AbstractEventLoop) -> bool:
    """No callback waits to run in this loop turn. asyncio's loops keep those in ``_ready``; a loop
    without it (uvloop) always gets the drain scheduled."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@hookimpl
def pagedserve_batching_policies() -> list[type[BatchingPolicy]]:
    return [DirectPolicy, DynamicPolicy]
