"""The inference routes of the ``http`` front-end: ``/infer``, ``/generate``, ``/generate_stream``.

Each request becomes the ``ModelInferRequest`` gRPC would carry and goes through
:meth:`ServerCore.start_request`, so statistics, metrics, traces and cancellation behave as they do
for gRPC. While a request runs, the connection is watched: a client that disconnects cancels it
(the LLM engine then aborts it and frees its KV blocks).
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import zlib
from collections.abc import Mapping
from typing import Any

from pagedserve.codec import ResponseEncoder, encode_response
from pagedserve.core import ServerCore, allows_unary
from pagedserve.errors import InferenceError
from pagedserve.frontends.http_body import (
    ClientGone,
    HttpError,
    Receive,
    error_json,
    parse_json,
    read_body,
    status_of,
)
from pagedserve.frontends.http_generate import decode_generate, encode_generate_response
from pagedserve.frontends.http_tensors import JsonResponseEncoder, decode_infer, empty_response
from pagedserve.responder import Delivery, ServerResponder
from starlette.responses import Response
from starlette.types import Scope, Send

FRONT_END = "HTTP server"
_DECOUPLED = "HTTP end point doesn't support models with decoupled transaction policy"
_NOT_ONE = (
    "generate expects model to produce exactly 1 response, use generate stream for model that generates "
    "various number of responses"
)
_EVENT_STREAM = "text/event-stream; charset=utf-8"


class Inbox:
    """The deliveries of one request (``deliver`` exists before the request starts), awaited by
    :meth:`Running.next` while the connection is watched.

    One future is awaited, woken by a delivery or by the watch ending (the client left), rather than
    ``asyncio.wait`` over both: that takes two more loop turns and a set per wait."""

    def __init__(self) -> None:
        self.deliveries: collections.deque[Delivery] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.client_gone = False

    def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# A request still unanswered this long (up to twice as long) after it started gets its connection
# watched. Most cheap models answer well within it, and a watch (a task reading the connection,
# cancelled at the end) costs more than such a model's whole request; for a long generation the
# delay is negligible.
_WATCH_DELAY_S = 0.005


class Watchlist:
    """The unanswered requests of one loop whose connections are not watched yet.

    One timer sweeps them every ``_WATCH_DELAY_S`` and starts the watch of each request that was
    already waiting at the previous sweep: a timer per request (scheduled, then cancelled) cost a
    measurable share of a cheap model's request."""

    def __init__(self) -> None:
        self._new: dict[Running, None] = {}
        self._due: dict[Running, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, running: Running) -> None:
        self._new[running] = None
        if self._timer is None:
            loop = running.responder.event_loop
            self._timer = loop.call_later(_WATCH_DELAY_S, self._sweep, loop)

    def discard(self, running: Running) -> None:
        self._new.pop(running, None)
        self._due.pop(running, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        due, self._due, self._new = self._due, self._new, {}
        for running in due:
            running.start_watch()
        self._timer = loop.call_later(_WATCH_DELAY_S, self._sweep, loop) if self._due else None


class Running:
    """One started request: its responder, inbox and the watch on its connection (started by the
    watchlist if the request is still unanswered after ``_WATCH_DELAY_S``)."""

    def __init__(
        self, responder: ServerResponder, inbox: Inbox, receive: Receive, watches: Watchlist
    ) -> None:
        self.responder = responder
        self.inbox = inbox
        self.receive = receive
        self.watches = watches
        self._watch: asyncio.Task[None] | None = None
        if not responder.finished:  # else answered within start_request: nothing to watch for
            watches.add(self)

    def start_watch(self) -> None:
        if self.responder.finished:  # the final answer is out: nothing left to cancel
            return
        self._watch = asyncio.ensure_future(_disconnected(self.receive))
        self._watch.add_done_callback(self._left)

    def _left(self, _: object) -> None:
        self.inbox.client_gone = True
        self.inbox.wake()

    def take(self) -> Delivery | None:
        """The next delivery if it is there already (a cheap model answers within start_request),
        without a coroutine for :meth:`next`."""
        deliveries = self.inbox.deliveries
        return deliveries.popleft() if deliveries else None

    async def next(self) -> Delivery:
        """The next delivery; cancels the request and raises ClientGone if the client leaves first."""
        inbox = self.inbox
        while not inbox.deliveries:
            if inbox.client_gone:
                self.responder.cancel()
                raise ClientGone
            inbox.waiter = self.responder.event_loop.create_future()
            await inbox.waiter
        return inbox.deliveries.popleft()

    def close(self) -> None:
        self.watches.discard(self)
        if self._watch is not None:
            self._watch.remove_done_callback(self._left)
            self._watch.cancel()
        if not self.responder.finished:
            self.responder.cancel()
        trace = self.responder.trace
        if trace is not None:
            trace.mark("HTTP_SEND_END")
            trace.finish()


class InferenceRoutes:
    """``/infer``, ``/generate`` and ``/generate_stream`` over the core, with the watchlist their
    requests share."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.watches = Watchlist()

    def start(self, message: Any, receive: Receive, encoder: ResponseEncoder = encode_response) -> Running:
        inbox = Inbox()
        try:
            # The inbox only queues: an answer made within start_request may go straight into it.
            responder, _ = self.core.start_request(
                message, inbox.deliver, FRONT_END, encoder, deliver_early=True
            )
        except InferenceError as error:
            raise HttpError.of(error) from None
        return Running(responder, inbox, receive, self.watches)

    async def infer(
        self, headers: Mapping[str, str], receive: Receive, model: str, version: str
    ) -> InferAnswer:
        core = self.core
        spec = core.manager.resolve(model, version).spec
        if spec.decoupled and not allows_unary(spec):
            raise HttpError(_DECOUPLED, 501)
        limit = core.config.server.max_message_bytes
        body = await read_body(receive, headers, limit)
        call = decode_infer(body, _header_length(headers, len(body)), model, version, spec, limit)
        running = self.start(call.message, receive, JsonResponseEncoder(call))
        try:
            response, error = await _single(running, spec.decoupled)
        finally:
            running.close()
        if error is not None:
            raise HttpError.of(error)
        body = response if response is not None else empty_response(call.message)
        return _infer_response(b"".join(body.parts), body.header_length, headers.get("accept-encoding"))

    async def generate(
        self, headers: Mapping[str, str], receive: Receive, model: str, version: str, streaming: bool
    ) -> Response | EventStream:
        core = self.core
        metadata = core.model_metadata(model, version)
        limit = core.config.server.max_message_bytes
        body = await read_body(receive, headers, limit, compressed_ok=False)
        document = parse_json(body, "generate") if body.strip() else {}
        message = decode_generate(document, model, version, metadata, limit)
        running = self.start(message, receive)
        if streaming:
            return EventStream(running)
        try:
            return await _one_generation(running)
        finally:
            running.close()


# -- /infer ----------------------------------------------------------------------------------------


async def _single(running: Running, decoupled: bool) -> tuple[Any, InferenceError | None]:
    """The one response of a unary call (a decoupled model allowed here must send exactly one)."""
    last: Any = None
    count = 0
    while True:
        delivery = running.take() or await running.next()
        if delivery.error is not None:
            return None, delivery.error
        if delivery.message is not None:
            count += 1
            last = delivery.message
            if decoupled and count > 1:
                return None, InferenceError(f"expected a single response, got {count}")
        if delivery.final:
            if running.responder.trace is not None:
                running.responder.trace.mark("HTTP_SEND_START")
            return last, None


def _header_length(headers: Mapping[str, str], body_length: int) -> int | None:
    """``Inference-Header-Content-Length`` as Triton reads it (``std::stoi``: trailing text ignored)."""
    text = headers.get("inference-header-content-length")
    if text is None:
        return None
    value = _leading_int(text)
    if value is None:
        raise HttpError(f"Unable to parse Inference-Header-Content-Length, got: {text}")
    if not -(2**31) <= value < 2**31:
        raise HttpError(
            "Unable to parse Inference-Header-Content-Length, value is out of range [ -2147483648, "
            f"2147483647 ], got: {text}"
        )
    if value < 0 or value > body_length:
        raise HttpError(f"inference header size should be in range (0, {body_length}), got: {text}")
    return value


def _leading_int(text: str) -> int | None:
    stripped = text.lstrip()
    end = 1 if stripped[:1] in ("+", "-") else 0
    while end < len(stripped) and stripped[end].isdigit():
        end += 1
    head = stripped[:end]
    return int(head) if head and head not in ("+", "-") else None


class InferAnswer:
    """An ``/infer`` answer as two ASGI messages, its headers put together once here (starlette's
    ``Response`` rebuilds and re-encodes them, a measurable share of a cheap model's request)."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")


def _infer_response(body: bytes, header_length: int | None, accept: str | None) -> InferAnswer:
    headers = [_JSON if header_length is None else _BINARY]
    if header_length is not None:
        headers.append((b"inference-header-content-length", b"%d" % header_length))
    encoding = _response_encoding(accept) if accept and accept != "identity" else "identity"
    if encoding == "gzip":
        body = gzip.compress(body, compresslevel=1)
        headers.append((b"content-encoding", b"gzip"))
    elif encoding == "deflate":
        body = zlib.compress(body, 1)
        headers.append((b"content-encoding", b"deflate"))
    headers.append((b"content-length", b"%d" % len(body)))
    return InferAnswer(body, headers)


def _response_encoding(accept: str) -> str:
    """Triton's choice from ``Accept-Encoding``: the highest-weighted of identity, deflate, gzip."""
    best, weight = "identity", 0.0
    for item in accept.split(","):
        name, _, q = item.strip().partition(";q=")
        try:
            value = float(q) if q else 1.0
        except ValueError:
            continue
        if name in ("identity", "deflate", "gzip") and value > weight:
            best, weight = name, value
    return best


# -- /generate and /generate_stream ----------------------------------------------------------------


async def _one_generation(running: Running) -> Response:
    pieces: list[tuple[int, bytes]] = []
    while True:
        delivery = await running.next()
        running.responder.written()
        piece = _piece(delivery)
        if piece is not None:
            pieces.append(piece)
        if delivery.final:
            break
    if len(pieces) != 1:
        return Response(error_json(_NOT_ONE), 400, media_type="application/json")
    status, body = pieces[0]
    return Response(body, status, media_type="application/json")


def _piece(delivery: Delivery) -> tuple[int, bytes] | None:
    """One delivery as (status, JSON); None for a flags-only final."""
    if delivery.error is not None:
        return status_of(delivery.error), error_json(delivery.error.message)
    if delivery.message is None:
        return None
    try:
        return 200, encode_generate_response(delivery.message)
    except HttpError as error:
        return error.status, error_json(error.message)


class EventStream:
    """``generate_stream``'s server-sent events: the first piece fixes the HTTP status, later errors
    travel as ``data: {"error": ...}`` events, as Triton sends them."""

    def __init__(self, running: Running) -> None:
        self.running = running

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        running = self.running
        try:
            started = False
            while True:
                delivery = await running.next()
                piece = _piece(delivery)
                if piece is not None:
                    status, body = piece
                    if not started:
                        started = True
                        await send(_start(status))
                    await send(
                        {"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": True}
                    )
                running.responder.written()
                if delivery.final:
                    break
            if not started:
                await send(_start(200))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            running.responder.cancel()
        finally:
            running.close()


def _start(status: int) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", _EVENT_STREAM.encode()), (b"cache-control", b"no-cache")],
    }
