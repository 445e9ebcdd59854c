"""ModelStreamInfer's write accounting: a decoupled request's responder hears of every response that
left (``Responder.unwritten`` falls back to zero), which is what lets a streaming model pace itself."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from pagedserve.codec import RequestOptions
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.responder import Delivery
from pagedserve.stream import StreamSession


class _Responder:
    def __init__(self) -> None:
        self.unwritten = 0
        self.trace = None

    def send(self) -> None:  # what ServerResponder.send counts before posting a delivery
        self.unwritten += 1

    def written(self) -> None:
        self.unwritten -= 1

    def cancel(self) -> None:
        pass


def _session(decoupled: bool) -> tuple[StreamSession, _Responder, list[Any]]:
    responder, deliveries = _Responder(), []

    def start_request(message: pb.ModelInferRequest, deliver: Any) -> tuple[Any, RequestOptions]:
        deliveries.append(deliver)
        return responder, RequestOptions()

    session = StreamSession(lambda name: SimpleNamespace(decoupled=decoupled), start_request)
    return session, responder, deliveries


async def _read_one(session: StreamSession) -> None:
    async def requests() -> Any:
        yield pb.ModelInferRequest(model_name="m", id="r")

    await session.read(requests())  # the client sends one request and half-closes


def _piece(text: bytes) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", id="r")
    response.raw_output_contents.append(text)
    return response


def test_decoupled_responses_count_as_written_only_once_the_stream_took_them() -> None:
    async def scenario() -> list[int]:
        session, responder, deliveries = _session(decoupled=True)
        await _read_one(session)
        deliver = deliveries[0]
        for i, final in enumerate([False, False, True]):
            responder.send()
            deliver(Delivery(_piece(b"%d" % i), None, final))
        seen = [responder.unwritten]  # all three queued, none written
        async for _ in session.messages():
            seen.append(responder.unwritten)  # the one just yielded is still being written
        return [*seen, responder.unwritten]

    assert asyncio.run(scenario()) == [3, 3, 2, 1, 0]


def test_flags_only_final_and_ordered_responses_count_as_written_at_once() -> None:
    async def scenario(decoupled: bool) -> int:
        session, responder, deliveries = _session(decoupled)
        await _read_one(session)
        responder.send()
        deliveries[0](Delivery(_piece(b"x"), None, False))
        responder.send()
        deliveries[0](Delivery(None, None, True))  # flags only: nothing to write when decoupled
        async for _ in session.messages():
            pass
        return responder.unwritten

    assert asyncio.run(scenario(decoupled=True)) == 0
    assert asyncio.run(scenario(decoupled=False)) == 0
