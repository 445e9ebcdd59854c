"""In-process inference: one loaded model asks another for a result (ensembles, BLS).

A request goes the gRPC front end's way, minus the wire: resolve and hold a version through the
:class:`~pagedserve.model_manager.ModelManager`, validate the tensors against its config, queue it on
its batching policy. Responses come back as the model sent them (numpy arrays, cast to the declared
output types, never serialized), to a callback or through an :class:`InferenceCall`; statistics are
recorded for the called model as for any client's request.

Every request carries its caller chain, the models that led to it: a call into a model already on
the chain (it would wait for itself) and a chain deeper than :data:`MAX_DEPTH` are refused. This
module does not know about protobuf, ensembles or the python backend's ``pb_utils`` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np
from pagedserve import datatypes
from pagedserve.codec import RequestDecoder
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse, ParameterValue, Responder

if TYPE_CHECKING:
    from pagedserve.model_manager import LoadedVersion, ModelManager

log = logging.getLogger(__name__)

MAX_DEPTH = 16
"""Models on one request's caller chain: ensembles of ensembles and BLS calls nest at most this deep."""

ModelKey = tuple[str, int]
"""(model name, version) of one model on a caller chain."""

OnResponse = Callable[[InferenceResponse | None, bool], None]
"""Called with each response the model sends (``None``: flags only) and whether it is the final one."""


@dataclass(frozen=True)
class CallOptions:
    """The request's fields besides its tensors, as a client would set them."""

    request_id: str = ""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False


@dataclass(frozen=True)
class Caller:
    """Who asks: the caller chain, and the request whose cancellation cancels this one (an ensemble's
    own request; none for a BLS call, which Triton does not tie to its caller)."""

    chain: tuple[ModelKey, ...] = ()
    parent: Responder | None = None


def chain_of(request: InferenceRequest) -> tuple[ModelKey, ...]:
    """The caller chain of ``request``, ending with its own model."""
    responder = request.responder
    if isinstance(responder, InProcessResponder):
        return responder.chain
    return ((request.model_name, request.model_version),)


def _describe(chain: Sequence[ModelKey]) -> str:
    return " -> ".join(name for name, _ in chain)


class InProcessResponder(Responder):
    """Hands a model's responses to ``on_response`` as they are; records the called model's statistics
    and releases its version on the final response, as the front end's responder does."""

    def __init__(
        self,
        loaded: LoadedVersion,
        on_response: OnResponse,
        chain: tuple[ModelKey, ...],
        parent: Responder | None,
    ) -> None:
        self.loaded = loaded
        self.on_response = on_response
        self.chain = chain
        self.parent = parent
        self.request: InferenceRequest | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._cancelled = False
        self._responses = 0
        self._last_ns = time.monotonic_ns()
        self._output_ns = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.parent is not None and self.parent.cancelled)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def unwritten(self) -> int:
        # A streaming step of an ensemble folds its pieces while the ensemble's client lags behind.
        return self.parent.unwritten if self.parent is not None else 0

    def send(self, response: InferenceResponse | None, final: bool) -> None:
        with self._lock:
            if self._finished:
                raise RuntimeError("response sent after the final response")
            self._finished = final
            index, self._responses = self._responses, self._responses + 1
            request = self.request
        assert request is not None
        start = time.monotonic_ns()
        if response is not None and response.error is None:
            response = self._typed(request, response)
        end = time.monotonic_ns()
        self._record(index, response, start, end)
        if final:
            self._finish(request, response.error if response is not None else None)
            self.request = None
        try:
            self.on_response(response, final)
        except Exception:  # noqa: BLE001 - the caller's bug must not fail the model that answered
            log.exception("in-process response handler of '%s' failed", self.loaded.spec.name)

    def _typed(self, request: InferenceRequest, response: InferenceResponse) -> InferenceResponse:
        """The requested outputs, cast to the declared types, as the wire would carry them."""
        declared = self.loaded.spec.output_datatypes
        outputs: dict[str, np.ndarray] = {}
        try:
            for name in request.requested_outputs:
                if name in response.outputs:
                    outputs[name] = _as_datatype(np.asarray(response.outputs[name]), declared.get(name))
        except (ValueError, TypeError) as error:
            return InferenceResponse(error=InferenceError.internal(f"failed to encode response: {error}"))
        return InferenceResponse(outputs=outputs, parameters=response.parameters)

    def _record(self, index: int, response: InferenceResponse | None, start: int, end: int) -> None:
        infer_ns, self._last_ns = start - self._last_ns, start
        ok = response is None or response.error is None
        self._output_ns += end - start
        stats = self.loaded.stats
        stats.record_response(index, infer_ns=infer_ns, output_ns=end - start, ok=ok, empty=response is None)

    def _finish(self, request: InferenceRequest, error: InferenceError | None) -> None:
        timing = request.timing
        now = time.monotonic_ns()
        if error is None:
            started = timing.compute_start_ns or now
            self.loaded.stats.record_success(
                total_ns=now - timing.arrival_ns,
                queue_ns=started - (timing.queued_ns or started),
                input_ns=timing.compute_input_ns,
                infer_ns=(timing.compute_end_ns or now) - started,
                output_ns=self._output_ns,
                batch_size=request.batch_size,
            )
        else:
            self.loaded.stats.record_failure(now - timing.arrival_ns, error.failure_reason)
        self.loaded.release()


def _as_datatype(array: np.ndarray, datatype: str | None) -> np.ndarray:
    if datatype is None:
        return array
    if datatype == "BYTES":
        return _as_bytes_array(array)
    return array.astype(datatypes.numpy_dtype(datatype), copy=False)


def _as_bytes_array(array: np.ndarray) -> np.ndarray:
    """BYTES as the server holds it: an object array of ``bytes`` (``str`` encoded as UTF-8)."""
    if array.dtype == np.object_ and all(isinstance(item, bytes) for item in array.flat):
        return array
    result = np.empty(array.shape, dtype=np.object_)
    for index, item in np.ndenumerate(array):
        if isinstance(item, str):
            result[index] = item.encode()
        elif isinstance(item, bytes | np.bytes_):
            result[index] = bytes(item)
        else:
            raise TypeError(f"a BYTES element must be bytes or str, got {type(item).__name__}")
    return result


class InProcessClient:
    """Issues requests to the models a :class:`ModelManager` has loaded. Thread-safe."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def start(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        on_response: OnResponse,
        *,
        model_version: int = -1,
        requested_outputs: Sequence[str] | None = None,
        options: CallOptions = CallOptions(),  # noqa: B008 - frozen, shared safely
        caller: Caller = Caller(),  # noqa: B008 - frozen, shared safely
    ) -> InProcessResponder:
        """Queue one request; its responses go to ``on_response`` (from the model's threads). Raise
        ``InferenceError`` if it cannot start (unknown model, bad tensors, recursion)."""
        arrival = time.monotonic_ns()
        self._check_chain(model_name, caller.chain)
        loaded = self.manager.acquire(model_name, _version_string(model_version))
        chain = (*caller.chain, (loaded.spec.name, loaded.version))
        responder = InProcessResponder(loaded, on_response, chain, caller.parent)
        try:
            request = self._request(loaded, inputs, requested_outputs, options, responder)
        except InferenceError as error:
            loaded.stats.record_failure(time.monotonic_ns() - arrival, error.failure_reason)
            loaded.release()
            raise
        request.timing.arrival_ns = arrival
        request.timing.compute_input_ns = time.monotonic_ns() - arrival
        responder.request = request
        loaded.submit(request)
        return responder

    def call(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        model_version: int = -1,
        requested_outputs: Sequence[str] | None = None,
        options: CallOptions = CallOptions(),  # noqa: B008
        caller: Caller = Caller(),  # noqa: B008
    ) -> InferenceCall:
        """:meth:`start`, with the responses collected for iteration; a request that cannot start
        yields its error as the one response."""
        call = InferenceCall()
        try:
            call.responder = self.start(
                model_name,
                inputs,
                call.put,
                model_version=model_version,
                requested_outputs=requested_outputs,
                options=options,
                caller=caller,
            )
        except InferenceError as error:
            call.put(InferenceResponse(error=error), True)
        return call

    @staticmethod
    def _check_chain(model_name: str, chain: tuple[ModelKey, ...]) -> None:
        if any(name == model_name for name, _ in chain):
            raise InferenceError(
                f"model '{model_name}' is already running this request's caller chain "
                f"({_describe(chain)} -> {model_name}); a call into it would wait for itself"
            )
        if len(chain) >= MAX_DEPTH:
            raise InferenceError(
                f"in-process calls nest at most {MAX_DEPTH} models deep ({_describe(chain)} -> {model_name})"
            )

    def _request(
        self,
        loaded: LoadedVersion,
        inputs: Mapping[str, np.ndarray],
        requested_outputs: Sequence[str] | None,
        options: CallOptions,
        responder: InProcessResponder,
    ) -> InferenceRequest:
        decoder = loaded.decoder
        request = InferenceRequest(
            model_name=loaded.spec.name,
            model_version=loaded.version,
            inputs={},
            requested_outputs=[],
            responder=responder,
            id=options.request_id,
            parameters=dict(options.parameters),
            priority=options.priority,
            timeout_us=options.timeout_us,
            sequence_id=options.sequence_id,
            sequence_start=options.sequence_start,
            sequence_end=options.sequence_end,
        )
        batch_sizes: set[int] = set()
        for name, value in inputs.items():
            request.inputs[name] = _checked_input(decoder, name, np.asarray(value), batch_sizes)
        decoder._check_required(request)
        if decoder.max_batch_size > 0 and batch_sizes:
            request.batch_size = batch_sizes.pop()
        request.requested_outputs = _checked_outputs(decoder, requested_outputs)
        return request


def _checked_input(
    decoder: RequestDecoder, name: str, array: np.ndarray, batch_sizes: set[int]
) -> np.ndarray:
    """``array`` as input ``name`` of the decoder's model, or Triton's error for it."""
    model = decoder.spec.name
    expected = decoder._expected.get(name)
    if expected is None:
        raise InferenceError(f"unexpected inference input '{name}' for model '{model}'")
    expected_type, dims = expected
    try:
        got = datatypes.from_numpy(array.dtype)
    except ValueError:
        got = "<invalid>"
    if expected_type == "BF16" and array.dtype == np.uint16:
        got = "BF16"  # numpy has no bfloat16: BF16 travels as its 16-bit words
    if got != expected_type:
        raise InferenceError(
            f"inference input '{name}' data-type is '{got}', but model '{model}' expects '{expected_type}'"
        )
    decoder._check_shape(name, list(array.shape), dims, batch_sizes)
    if expected_type == "BYTES":
        try:
            return _as_bytes_array(array)
        except TypeError as error:
            raise InferenceError(f"inference input '{name}' for model '{model}': {error}") from None
    return array


def _checked_outputs(decoder: RequestDecoder, requested: Sequence[str] | None) -> list[str]:
    if requested is None or not requested:
        return list(decoder.outputs)
    names: list[str] = []
    for name in requested:
        if name in names:
            raise InferenceError(f"output '{name}' already exists in request")
        if name not in decoder.outputs:
            raise InferenceError(f"unexpected inference output '{name}' for model '{decoder.spec.name}'")
        names.append(name)
    return names


def _version_string(version: int) -> str:
    """Triton's BLS and ensemble convention: -1 (or 0) is the latest ready version."""
    if version in (-1, 0):
        return ""
    if version < 0:
        raise InferenceError(f"invalid model version {version}: -1 (latest) or a version >= 1")
    return str(version)


_END = object()


class InferenceCall:
    """The responses of one in-process request, for a blocking or an async reader. Each item is an
    :class:`InferenceResponse` (its ``error`` set when the request failed); a flags-only final
    response comes as an empty one, as Triton's BLS iterator yields it."""

    def __init__(self) -> None:
        self.responder: InProcessResponder | None = None
        self._items: queue.SimpleQueue[tuple[InferenceResponse, bool]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_items: asyncio.Queue[tuple[InferenceResponse, bool]] | None = None
        self._lock = threading.Lock()

    def put(self, response: InferenceResponse | None, final: bool) -> None:
        if response is None and not final:
            return  # nothing to read
        item = (response if response is not None else InferenceResponse(), final)
        with self._lock:
            if self._async_items is None:
                self._items.put(item)
                return
            loop, target = self._loop, self._async_items
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the reader's loop is gone: nobody reads
            loop.call_soon_threadsafe(target.put_nowait, item)

    def cancel(self) -> None:
        if self.responder is not None:
            self.responder.cancel()

    def responses(self, timeout_s: float | None = None) -> Iterator[InferenceResponse]:
        """Each response until the final one; after ``timeout_s`` the request is cancelled and the
        last item is a "Request timeout expired" error."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                response, final = self._items.get(timeout=wait)
            except queue.Empty:
                self.cancel()
                yield _timed_out()
                return
            yield response
            if final:
                return

    async def aresponses(self, timeout_s: float | None = None) -> AsyncIterator[InferenceResponse]:
        """:meth:`responses` for a coroutine on a running event loop."""
        items = self._async_queue()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                response, final = await asyncio.wait_for(items.get(), wait)
            except TimeoutError:
                self.cancel()
                yield _timed_out()
                return
            yield response
            if final:
                return

    def _async_queue(self) -> asyncio.Queue[tuple[InferenceResponse, bool]]:
        with self._lock:
            if self._async_items is None:
                self._loop = asyncio.get_running_loop()
                self._async_items = asyncio.Queue()
                while not self._items.empty():  # what came before the reader did
                    self._async_items.put_nowait(self._items.get_nowait())
            return self._async_items

    def result(self, timeout_s: float | None = None) -> InferenceResponse:
        """The one response of a non-streaming request (its error, if any, in ``error``)."""
        return _single(self.responses(timeout_s), self)

    async def aresult(self, timeout_s: float | None = None) -> InferenceResponse:
        return _single([r async for r in self.aresponses(timeout_s)], self)


def _single(
    responses: Iterator[InferenceResponse] | list[InferenceResponse], call: InferenceCall
) -> InferenceResponse:
    answer: InferenceResponse | None = None
    for response in responses:
        if response.error is not None:
            return response
        if not response.outputs and answer is not None:
            continue  # the flags-only final after the answer
        if answer is not None and answer.outputs:
            call.cancel()
            model = call.responder.loaded.spec.name if call.responder is not None else "the model"
            return InferenceResponse(
                error=InferenceError(
                    f"model '{model}' sent more than one response; use a decoupled (streaming) call"
                )
            )
        answer = response
    return answer if answer is not None else InferenceResponse()


def _timed_out() -> InferenceResponse:
    return InferenceResponse(error=InferenceError("Request timeout expired", grpc.StatusCode.UNAVAILABLE))
