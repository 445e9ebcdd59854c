"""One ModelStreamInfer call: many requests in on one stream, their responses out.

Per-request errors go out in-band (``error_message``), unless the client opened the stream with the
``triton_grpc_error: true`` header: then the first error ends the whole stream with its gRPC status
and message, as Triton does. Every response carries ``triton_final_response``; non-decoupled models
answer in request order, decoupled ones as they come.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

from pagedserve.backend import ModelSpec
from pagedserve.call_guard import Malformed
from pagedserve.codec import RequestOptions, stream_response
from pagedserve.errors import InferenceError
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.responder import Delivery, ServerResponder
from pagedserve.tracing import Trace

# Resolves, decodes and queues one request (InferenceServicer.start_request).
StartRequest = Callable[
    [pb.ModelInferRequest, Callable[[Delivery], None]], tuple[ServerResponder, RequestOptions]
]

# Request metadata (gRPC lower-cases header names) that switches a stream to "gRPC status" errors.
GRPC_ERROR_HEADER = "triton_grpc_error"


def wants_status_errors(context: Any) -> bool:
    """Whether the client opened the stream with ``triton_grpc_error: true``."""
    metadata = context.invocation_metadata() if context is not None else None
    return any(
        key == GRPC_ERROR_HEADER and str(value).strip().lower() == "true" for key, value in metadata or ()
    )


def sent(trace: Trace) -> None:
    """The response left: close the trace's timeline and export it."""
    trace.mark("GRPC_SEND_END")
    trace.finish()


class StreamSession:
    """One ModelStreamInfer call: many requests in, their responses out.

    Decoupled responses go out as they come; non-decoupled ones keep request order, so each takes a
    slot in ``ordered`` and leaves only when every earlier slot has. With ``context`` (the RPC's
    ``grpc.aio`` context) and the ``triton_grpc_error`` header, the first error aborts the RPC instead.
    """

    _END = object()

    def __init__(
        self,
        spec_of: Callable[[str], ModelSpec | None],
        start_request: StartRequest,
        context: Any = None,
    ) -> None:
        self.spec_of = spec_of
        self.start_request = start_request
        self.context = context
        self.status_errors = wants_status_errors(context)
        self.failed = False
        """An error has ended the stream (status-error mode): nothing more goes out."""
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        """``(message, responder)`` pairs to write (the responder is told once its message is out)."""
        self.ordered: collections.deque[list[pb.ModelStreamInferResponse | None]] = collections.deque()
        self.responders: set[ServerResponder] = set()
        self.active = 0
        self.reading = True
        self.unsent_traces: dict[int, Trace] = {}
        """Traces of finished requests by ``id()`` of their last stream message, until it is written."""

    async def read(self, request_iterator: AsyncIterator[pb.ModelInferRequest | Malformed]) -> None:
        try:
            async for message in request_iterator:
                self.start(message)
        finally:
            self.reading = False
            self._maybe_end()

    def start(self, message: pb.ModelInferRequest | Malformed) -> None:
        malformed = message if isinstance(message, Malformed) else None
        if malformed is not None:
            message = pb.ModelInferRequest()  # answered in-band, in order, and the stream goes on
        spec = self.spec_of(message.model_name)
        slot: list[pb.ModelStreamInferResponse | None] | None = None
        if spec is None or not spec.decoupled:
            slot = [None]
            self.ordered.append(slot)
        self.active += 1
        state: dict[str, Any] = {}

        def deliver(delivery: Delivery) -> None:
            self._deliver(message, state, slot, delivery)

        try:
            if malformed is not None:
                raise InferenceError(malformed.message)
            responder, options = self.start_request(message, deliver)
        except InferenceError as error:
            deliver(Delivery(None, error, True))
            return
        state["options"] = options
        state["responder"] = responder
        self.responders.add(responder)

    def _deliver(
        self,
        request: pb.ModelInferRequest,
        state: dict[str, Any],
        slot: list[pb.ModelStreamInferResponse | None] | None,
        delivery: Delivery,
    ) -> None:
        options: RequestOptions = state.get("options") or RequestOptions()
        responder: ServerResponder | None = state.get("responder")
        if self.status_errors and delivery.error is not None:
            self._fail(delivery.error)
        out = None if self.failed else self._message(request, options, slot, delivery)
        if slot is None and out is not None:
            self.out.put_nowait((out, responder))
        else:
            # Ordered responses leave with their slot, not one by one: they count as written now.
            if responder is not None:
                responder.written()
            if slot is not None:
                self._fill_slot(slot, out, delivery)
        if delivery.final:
            self._follow_trace(responder, out if slot is None else slot[0])
            self.responders.discard(responder)  # type: ignore[arg-type]
            self.active -= 1
            self._flush()
            self._maybe_end()

    @staticmethod
    def _message(
        request: pb.ModelInferRequest,
        options: RequestOptions,
        slot: list[pb.ModelStreamInferResponse | None] | None,
        delivery: Delivery,
    ) -> pb.ModelStreamInferResponse | None:
        """What goes on the stream for one delivery (None: nothing)."""
        if delivery.error is not None:
            return pb.ModelStreamInferResponse(
                error_message=delivery.error.message,
                infer_response=pb.ModelInferResponse(
                    id=request.id, model_name=request.model_name, model_version=request.model_version
                ),
            )
        if delivery.message is not None:
            out = stream_response(delivery.message)
            out.infer_response.parameters["triton_final_response"].bool_param = delivery.final
            return out
        if delivery.final and (slot is not None or options.enable_empty_final_response):
            out = pb.ModelStreamInferResponse(
                infer_response=pb.ModelInferResponse(
                    id=request.id, model_name=request.model_name, model_version=request.model_version
                )
            )
            out.infer_response.parameters["triton_final_response"].bool_param = True
            return out
        return None

    def _fail(self, error: InferenceError) -> None:
        # Triton closes the stream at once: earlier responses still waiting for their turn are dropped.
        if not self.failed:
            self.failed = True
            self.out.put_nowait(error)

    def _fill_slot(
        self,
        slot: list[pb.ModelStreamInferResponse | None],
        out: pb.ModelStreamInferResponse | None,
        delivery: Delivery,
    ) -> None:
        # A non-decoupled model may send its response and the final flag separately: keep the last
        # real message and mark it final.
        if out is not None and (out.error_message or out.infer_response.outputs or slot[0] is None):
            slot[0] = out
        if delivery.final and slot[0] is not None and not slot[0].error_message:
            slot[0].infer_response.parameters["triton_final_response"].bool_param = True
        if delivery.final:
            slot.append(None)  # marks the slot complete

    def _follow_trace(
        self, responder: ServerResponder | None, last: pb.ModelStreamInferResponse | None
    ) -> None:
        trace = responder.trace if responder is not None else None
        if trace is None:
            return
        if last is None:
            trace.finish()  # nothing goes out for this request
        else:
            self.unsent_traces[id(last)] = trace

    def _flush(self) -> None:
        while self.ordered and len(self.ordered[0]) == 2:
            message = self.ordered.popleft()[0]
            if message is not None:
                self.out.put_nowait((message, None))

    def _maybe_end(self) -> None:
        if not self.reading and self.active == 0:
            self.out.put_nowait(self._END)

    async def messages(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        while True:
            item = await self.out.get()
            if item is self._END:
                return
            if isinstance(item, InferenceError):
                await self.context.abort(item.code, item.message)  # raises: the RPC ends here
            message, responder = item
            trace = self.unsent_traces.pop(id(message), None)
            if trace is not None:
                trace.mark("GRPC_SEND_START")
            yield message
            if responder is not None:
                responder.written()
            if trace is not None:
                sent(trace)

    def cancel_all(self) -> None:
        for responder in list(self.responders):
            responder.cancel()
