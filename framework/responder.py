"""The server's Responder: encodes a model's responses in the calling thread, hands them to the loop.

Encoding happens where the model sends (a worker or engine thread), so the event loop only writes
finished messages: protobuf by default, or what the request's front-end asked for (the HTTP
``/infer`` route's JSON body). The final response records the request's statistics, closes its trace
timeline, releases its shared-memory regions and the model version (unload waits for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.codec import (
    NO_OPTIONS,
    InferResponseMessage,
    ResponseEncoder,
    encode_response,
)
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse, Responder
from pagedserve.model_manager import LoadedVersion
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.shared_memory import RegionLease
from pagedserve.tracing import Trace


@dataclass
class Delivery:
    """One message for the client: a response, an error, or a flags-only final (``message`` None).
    ``message`` is what the request's encoder made (a ModelInferResponse unless it asked otherwise)."""

    message: pb.ModelInferResponse | InferResponseMessage | Any
    error: InferenceError | None
    final: bool


class LoopMailbox:
    """Hands work from other threads to the event loop, one wake-up per burst.

    ``call_soon_threadsafe`` writes to the loop's self-pipe every time; under load a batch of
    responses would wake the loop once each. Posts that arrive while a drain is already scheduled
    ride along with it; a post from the loop's own thread (a model run on the loop) needs no wake-up,
    and one from a plain loop callback (the batch of such a model) is delivered at once: no
    front-end code is on the stack there, and a loop turn saved is a sizeable share of a cheap
    request. Inside a task (a front-end starting a request) it waits for the next turn, so ``deliver``
    never runs before ``start_request`` has returned, unless the front-end said its ``deliver`` may
    (``early``: it only queues). Made on the loop's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.get_ident()
        self._items: list[tuple[Callable[[Delivery], None], Delivery]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, deliver: Callable[[Delivery], None], delivery: Delivery, early: bool = False) -> None:
        on_loop = threading.get_ident() == self._thread
        if on_loop and not self._scheduled and (early or asyncio.current_task(self.loop) is None):
            deliver(delivery)  # nothing of this loop's is queued before it: the order stays
            return
        with self._lock:
            self._items.append((deliver, delivery))
            if self._scheduled:
                return
            self._scheduled = True
        if on_loop:
            self.loop.call_soon(self._drain)
            return
        # RuntimeError: the loop is gone (server stopped) and nobody is left to read it.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._drain)

    def serves_this_thread(self) -> bool:
        """Whether this thread runs the mailbox's loop now: a thread runs one loop at a time, so this
        answers what ``asyncio.get_running_loop() is self.loop`` does without its ``getpid()``
        system call (Python 3.11 checks the process on every call)."""
        return threading.get_ident() == self._thread and self.loop.is_running()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for deliver, delivery in items:
            deliver(delivery)


# gRPC receives a message in many small blocks; once freed, glibc keeps their pages in its arenas
# (free blocks between live ones are never given back on their own): 30 sequential 60 MiB requests
# left RSS 240 MiB above its start, and growing. A trim after each large request (about 1 ms, with
# the GIL released) returns them; the blocks of the next message come from the kernel again.
_TRIM_AFTER_BYTES = 16 * 2**20


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _return_freed_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


def _message_bytes(request: InferenceRequest, response: InferenceResponse | None) -> int:
    """About how large the request's and its final response's messages were: their tensors, which
    every encoder copies (protobuf, or the HTTP front-end's JSON and binary outputs)."""
    size = 0
    for array in request.inputs.values():  # loops, not sum() over generators: once per request
        size += array.nbytes
    if response is not None:
        for value in response.outputs.values():
            size += getattr(value, "nbytes", 0)
    return size


def _delivered(delivery: Delivery) -> None:
    """``deliver`` after the final response: nothing may be sent any more (``send`` refuses)."""


class ServerResponder(Responder):
    def __init__(
        self,
        mailbox: LoopMailbox,
        loaded: LoadedVersion,
        deliver: Callable[[Delivery], None],
        encoder: ResponseEncoder = encode_response,
        deliver_early: bool = False,
    ) -> None:
        self.mailbox = mailbox
        self.loaded = loaded
        self.deliver = deliver
        self.encoder = encoder
        self.deliver_early = deliver_early
        """``deliver`` may run inside the front-end's own ``start_request`` call (see LoopMailbox)."""
        self.request: InferenceRequest | None = None
        self.options = NO_OPTIONS
        """Output placement (shared memory, classification), set by the server after decoding."""
        self.lease: RegionLease | None = None
        self.trace: Trace | None = None
        self._encode_span: tuple[int, int] | None = None  # (start, end) of the last response's encoding
        self._lock = threading.Lock()
        self._finished = False
        self._cancelled = False
        self._unwritten = 0
        self._output_ns = 0
        self._responses = 0
        self._last_ns = time.monotonic_ns()

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The server loop the responses go to (a batching policy may run cheap models on it)."""
        return self.mailbox.loop

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def unwritten(self) -> int:
        # Counted down by ModelStreamInfer as it writes; a unary call answers once and is not paced.
        return self._unwritten

    def written(self) -> None:
        """One sent response left for the client, or turned out to have nothing to write."""
        with self._lock:
            self._unwritten -= 1

    def send(self, response: InferenceResponse | None, final: bool) -> None:
        with self._lock:
            if self._finished:
                raise RuntimeError("response sent after the final response")
            self._finished = final
            self._unwritten += 1
            request = self.request  # a final sent meanwhile from another thread clears it
        assert request is not None
        delivery = self._encode(request, response, final)
        deliver = self.deliver
        large = False
        if final:
            large = _message_bytes(request, response) >= _TRIM_AFTER_BYTES
            self._finish(delivery.error)
            # The request refers back to this responder (request.responder) and ``deliver`` holds
            # the call's messages: without the cycle, the request's tensors and both messages go as
            # soon as the call ends. Left to the cyclic GC, which large buffers do not trigger, a
            # 60 MiB request kept ~200 MiB alive after its answer, and more with every request.
            self.request = None
            self.deliver = _delivered
        self.mailbox.post(deliver, delivery, self.deliver_early)
        if large:
            _return_freed_memory()

    def _encode(self, request: InferenceRequest, response: InferenceResponse | None, final: bool) -> Delivery:
        start = time.monotonic_ns()
        index, self._responses = self._responses, self._responses + 1
        infer_ns, self._last_ns = start - self._last_ns, start
        if response is not None and response.error is not None:
            self.loaded.stats.record_response(index, infer_ns=infer_ns, output_ns=0, ok=False, empty=False)
            return Delivery(None, response.error, final)
        try:  # a flags-only final (``response`` None) has no message
            message = (
                None if response is None else self.encoder(self.loaded.spec, request, response, self.options)
            )
        except InferenceError as error:  # e.g. a shared-memory output too small for the result
            return Delivery(None, error, final)
        except Exception as error:  # noqa: BLE001 - a model returned something we cannot encode
            return Delivery(None, InferenceError.internal(f"failed to encode response: {error}"), final)
        end = time.monotonic_ns()
        output_ns = end - start
        if self.trace is not None and response is not None:
            self._trace_response(self.trace, response, start, end)
        self._output_ns += output_ns
        empty = response is None
        self.loaded.stats.record_response(index, infer_ns=infer_ns, output_ns=output_ns, ok=True, empty=empty)
        return Delivery(message, None, final)

    def _finish(self, error: InferenceError | None) -> None:
        assert self.request is not None
        timing = self.request.timing
        now = time.monotonic_ns()
        stats = self.loaded.stats
        if error is None:
            started = timing.compute_start_ns or now
            stats.record_success(
                total_ns=now - timing.arrival_ns,
                queue_ns=started - (timing.queued_ns or started),
                input_ns=timing.compute_input_ns,
                infer_ns=(timing.compute_end_ns or now) - started,
                output_ns=self._output_ns,
                batch_size=self.request.batch_size,
            )
        else:
            stats.record_failure(now - timing.arrival_ns, error.failure_reason)
        if self.trace is not None:
            self._trace_timeline(self.trace, now)
        if self.lease is not None:
            self.lease.release()  # may complete a deferred unregister
        self.loaded.release()

    def _trace_response(self, trace: Trace, response: InferenceResponse, start: int, end: int) -> None:
        self._encode_span = (start, end)
        trace.mark("INFER_RESPONSE_COMPLETE", end)
        if trace.wants_tensors:
            declared = self.loaded.spec.output_datatypes
            for name, value in response.outputs.items():
                trace.record_tensor("TENSOR_BACKEND_OUTPUT", name, declared.get(name, ""), value)

    def _trace_timeline(self, trace: Trace, now: int) -> None:
        """Triton's timestamps from what the request's timing recorded (REQUEST_START came first)."""
        timing = self.request.timing if self.request is not None else None
        if timing is not None and timing.queued_ns:
            trace.mark("QUEUE_START", timing.queued_ns)
        if timing is not None and timing.compute_start_ns:
            # Inputs are already tensors when a model starts, so input preparation ends at once.
            trace.mark("COMPUTE_START", timing.compute_start_ns)
            trace.mark("COMPUTE_INPUT_END", timing.compute_start_ns)
            output_start, output_end = self._encode_span or (now, now)
            trace.mark("COMPUTE_OUTPUT_START", output_start)
            trace.mark("COMPUTE_END", output_end)
        trace.mark("REQUEST_END", now)
