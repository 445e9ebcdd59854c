"""What a gRPC call passes before its handler runs: the restricted-protocol check and a safe decode.

Restricted protocols are Triton's ``--grpc-restricted-protocol``: every RPC belongs to one protocol
group, and a group named in ``server.restricted_protocols`` answers only calls that carry the header
``triton-grpc-protocol-<key>: <value>``; others get UNAVAILABLE with Triton's message, before their
message is even decoded.

A message that does not parse would otherwise fail inside grpcio's deserializer and reach the client
as UNKNOWN with a Python exception name. Here the decoder turns it into :class:`Malformed`: unary
calls answer INVALID_ARGUMENT, and ModelStreamInfer answers in-band and keeps the stream open.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from pagedserve.config import RestrictedProtocol

HEADER_PREFIX = "triton-grpc-protocol-"
_SERVICE = "inference.GRPCInferenceService"

# Triton's grouping (grpc_server.cc); reflection describes the API, so it counts as metadata.
_PROTOCOL_OF_RPC = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
_PROTOCOL_OF_SERVICE = {
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "metadata",
    "grpc.reflection.v1.ServerReflection": "metadata",
}


def protocol_of(method: str) -> str | None:
    """The protocol group of a full method name (``/package.Service/Rpc``), None if it has none."""
    service, _, rpc = method.lstrip("/").partition("/")
    if service == _SERVICE:
        return _PROTOCOL_OF_RPC.get(rpc)
    return _PROTOCOL_OF_SERVICE.get(service)


class RestrictedProtocols(grpc.aio.ServerInterceptor):
    """Refuses calls to a restricted group that lack its header (UNAVAILABLE, as Triton)."""

    def __init__(self, restrictions: Sequence[RestrictedProtocol]) -> None:
        self._required: dict[str, tuple[str, bytes]] = {}
        for entry in restrictions:
            for protocol in entry.protocols:
                self._required[protocol] = (HEADER_PREFIX + entry.key, entry.value.encode())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        protocol = protocol_of(details.method)
        required = self._required.get(protocol) if protocol else None
        if handler is None or required is None:
            return handler
        header, value = required
        sent = next((v for k, v in details.invocation_metadata or () if k == header), None)
        if sent is not None and hmac.compare_digest(_as_bytes(sent), value):
            return handler
        return _refusal(handler, f"This protocol is restricted, expecting header '{header}'")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that answers UNAVAILABLE without reading the request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# -- safe decoding ------------------------------------------------------------------------------------


class Malformed:
    """Stands in for a request message that did not parse."""

    def __init__(self, rpc: str) -> None:
        self.message = f"failed to parse the {rpc} request message: malformed protobuf"


def _safe_decoder(rpc: str, decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def safe(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: the client's mistake
            return Malformed(rpc)

    return safe


def _serialize(message: Any) -> bytes:
    # Not the generated ``Message.SerializeToString`` descriptor, which refuses other types.
    return message.SerializeToString()


def _checked_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return checked


class _Capture:
    """Receives what the generated ``add_*Servicer_to_server`` registers, so it can be rewrapped."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


def add_guarded_service(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    service: str,
    decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
    self_checking: frozenset[str] = frozenset(),
) -> None:
    """Register ``servicer`` like the generated ``add_to_server`` does, with safe decoders: a
    malformed unary request answers INVALID_ARGUMENT; streaming handlers, and the unary ones named in
    ``self_checking`` (a hot path spared a wrapper), receive :class:`Malformed` and answer it
    themselves. ``decoders`` replaces protobuf's for the RPCs it names; a handler may return anything
    with ``SerializeToString`` (see ``codec.InferResponseMessage``)."""
    capture = _Capture()
    add_to_server(servicer, capture)
    guarded: dict[str, grpc.RpcMethodHandler] = {}
    for rpc, handler in capture.handlers.items():
        decoder = _safe_decoder(rpc, (decoders or {}).get(rpc, handler.request_deserializer))
        serializer = _serialize
        if handler.request_streaming:
            assert handler.stream_stream is not None, f"{rpc}: only stream-stream streaming is wrapped"
            guarded[rpc] = grpc.stream_stream_rpc_method_handler(handler.stream_stream, decoder, serializer)
        else:
            unary = handler.unary_unary
            assert unary is not None and inspect.iscoroutinefunction(unary), f"{rpc}: async unary expected"
            behaviour = unary if rpc in self_checking else _checked_unary(unary)
            guarded[rpc] = grpc.unary_unary_rpc_method_handler(behaviour, decoder, serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
    server.add_registered_method_handlers(service, guarded)
