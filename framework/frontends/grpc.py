"""The ``grpc`` front-end: ``inference.GRPCInferenceService`` plus grpc.health.v1 and reflection.

Protocol in, typed objects out: requests are decoded by :mod:`pagedserve.codec` in the core, and
whatever the model sends comes back through a :class:`~pagedserve.responder.ServerResponder`. Nothing
here runs a model or blocks the loop; the RPCs only translate their protobuf messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pagedserve import protocol
from pagedserve.call_guard import Malformed, RestrictedProtocols, add_guarded_service
from pagedserve.codec import RequestOptions, parse_infer_request
from pagedserve.config import ServeConfig, TlsConfig
from pagedserve.core import ServerCore, allows_unary
from pagedserve.errors import InferenceError
from pagedserve.frontends import Frontend, bind_error, bind_problem
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import grpc_service_pb2_grpc as pb_grpc
from pagedserve.responder import Delivery, ServerResponder
from pagedserve.stream import StreamSession, sent
from pagedserve.tls import server_credentials

log = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Each RPC translates its protobuf message into a call on the core and InferenceError into a
    gRPC status."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.shm = core.shm

    # -- health and metadata ----------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)  # still live while draining: it is finishing work

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        ready = await self._call(context, self.core.model_ready, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return self.core.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return await self._call(context, self.core.model_metadata, request.name, request.version)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return await self._call(context, self.core.model_config, request.name, request.version)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        return await self._call(context, self.core.model_statistics, request.name, request.version)

    # -- repository -------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "'repository_name' specification is not supported"
            )
        response = pb.RepositoryIndexResponse()
        for row in self.core.repository_index(request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._call(context, self.core.check_model_control)
        override: str | None = None
        for key, param in request.parameters.items():
            if key == "config":
                if param.WhichOneof("parameter_choice") != "string_param":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "invalid value type for load parameter 'config', expected string_param.",
                    )
                override = param.string_param
            elif key.startswith("file:"):
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"failed to load '{request.model_name}', failed to poll from model repository",
                )
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unrecognized load parameter '{key}'.")
        await self._await(context, self.core.load(request.model_name, override))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._call(context, self.core.check_model_control)
        param = request.parameters.get("unload_dependents")
        if param is not None and param.WhichOneof("parameter_choice") != "bool_param":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid value type for 'unload_dependents' parameter, expected bool_param.",
            )
        await self._await(context, self.core.unload(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    async def _call(
        self, context: Any, function: Callable[..., Any], *args: Any, blocking: bool = False
    ) -> Any:
        """Run a core call (in a thread when it may block) and map InferenceError to a status."""
        try:
            if blocking:
                return await asyncio.get_running_loop().run_in_executor(None, function, *args)
            return function(*args)
        except InferenceError as error:
            await context.abort(error.code, error.message)

    async def _await(self, context: Any, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except InferenceError as error:
            await context.abort(error.code, error.message)

    # -- inference --------------------------------------------------------------------------------

    def start_request(
        self, message: pb.ModelInferRequest, deliver: Callable[[Delivery], None]
    ) -> tuple[ServerResponder, RequestOptions]:
        return self.core.start_request(message, deliver, front_end="GRPC server")

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        spec = self.core.manager.spec(request.model_name)
        if spec is not None and spec.decoupled and not allows_unary(spec):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy",
            )
        call = _UnaryCall(asyncio.get_running_loop(), request, spec is not None and spec.decoupled)
        try:
            responder, _ = self.start_request(request, call.deliver)
        except InferenceError as error:
            await context.abort(error.code, error.message)
        context.add_done_callback(lambda _: responder.cancel())
        if responder.trace is not None:
            context.add_done_callback(lambda _, trace=responder.trace: sent(trace))
        await call.done
        if responder.trace is not None:
            responder.trace.mark("GRPC_SEND_START")
        if call.error is not None:
            responder.cancel()  # stops a decoupled model that kept sending
            await context.abort(call.error.code, call.error.message)
        return call.response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        stream = StreamSession(self.core.manager.spec, self.start_request, context)
        reader = asyncio.create_task(stream.read(request_iterator))
        try:
            async for message in stream.messages():
                yield message
        finally:
            reader.cancel()
            stream.cancel_all()
            for trace in stream.unsent_traces.values():
                trace.finish()

    # -- shared memory ----------------------------------------------------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in await self._call(context, self.shm.status, "system", request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await self._call(context, self.shm.check_enabled)
        await self._call(
            context, self.shm.register_system, request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._call(context, self.shm.check_enabled)
        self.shm.unregister("system", request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in await self._call(context, self.shm.status, "cuda", request.name):
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size
                )
            )
        return response

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await self._call(context, self.shm.check_enabled)
        args = (request.name, request.raw_handle, request.device_id, request.byte_size)
        # Opening an IPC handle may initialise CUDA (seconds): keep it off the loop.
        await self._call(context, self.shm.register_cuda, *args, blocking=True)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._call(context, self.shm.check_enabled)
        await self._call(context, self.shm.unregister, "cuda", request.name, blocking=True)
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- tracing and logging ----------------------------------------------------------------------

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        changes = {key: list(setting.value) for key, setting in request.settings.items()}
        settings = await self._call(context, self.core.trace_setting, request.model_name, changes)
        response = pb.TraceSettingResponse()
        for key, values in settings.items():
            response.settings[key].value.extend(values)
        return response

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        changes: dict[str, tuple[str | None, Any]] = {}
        for key, setting in request.settings.items():
            kind = setting.WhichOneof("parameter_choice")
            changes[key] = (kind, getattr(setting, kind) if kind else None)
        settings = await self._call(context, self.core.log_settings, changes)
        response = pb.LogSettingsResponse()
        for key, (kind, value) in settings.items():
            setattr(response.settings[key], kind, value)
        return response


class _UnaryCall:
    """What a model sends for one unary ModelInfer; ``done`` resolves once the answer is known."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, request: pb.ModelInferRequest, decoupled: bool
    ) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.request = request
        self.decoupled = decoupled
        self.last: pb.ModelInferResponse | None = None
        self.error: InferenceError | None = None

    def deliver(self, delivery: Delivery) -> None:
        if self.done.done():
            return
        if delivery.error is not None:
            self.error = delivery.error
        elif delivery.message is not None:
            if self.decoupled and self.last is not None and self.last.outputs:
                self.error = InferenceError(
                    f"model '{self.request.model_name}' sent more than one response; ModelInfer returns "
                    "one, use ModelStreamInfer for streaming"
                )
            self.last = delivery.message
        if delivery.final or self.error is not None:
            self.done.set_result(None)

    @property
    def response(self) -> pb.ModelInferResponse:
        if self.last is not None:
            return self.last
        request = self.request
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )


class GrpcFrontend(Frontend):
    """``grpc``: the grpc.aio server, with grpc.health.v1 mirroring readiness and reflection."""

    name = "grpc"

    def __init__(self, config: ServeConfig, core: ServerCore) -> None:
        super().__init__(config, core)
        self.servicer = InferenceServicer(core)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        limit = config.server.max_message_bytes
        restricted = config.server.restricted_protocols
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=[RestrictedProtocols(restricted)] if restricted else None,
        )
        add_guarded_service(
            pb_grpc.add_GRPCInferenceServiceServicer_to_server,
            self.servicer,
            self.server,
            protocol.SERVICE_NAME,
            # Large requests keep their tensors out of protobuf's copies (see codec).
            decoders={"ModelInfer": parse_infer_request, "ModelStreamInfer": parse_infer_request},
            self_checking=frozenset({"ModelInfer"}),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            protocol.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server, pool=_reflection_pool())
        self.port = 0

    def _bind(self, host: str, port: int, tls: TlsConfig) -> int:
        # grpcio neither says why a bind failed nor keeps quiet about it: probe with a plain socket.
        problem = bind_problem(host, port)
        if problem is None:
            address = f"{host}:{port}"
            try:
                if tls.enabled:
                    bound = self.server.add_secure_port(address, server_credentials(tls))
                else:
                    bound = self.server.add_insecure_port(address)
            except RuntimeError:
                bound = 0
            if bound:
                return bound
            problem = "the address could not be bound"
        raise bind_error(host, port, "server.grpc_port", problem)

    async def start(self) -> str:
        server = self.config.server
        self.port = self._bind(server.host, server.grpc_port, server.tls)
        await self.server.start()
        return f"GRPCInferenceService listening on {server.host}:{self.port}"

    def update_health(self) -> None:
        if self.core.exiting:
            return  # begin_drain set NOT_SERVING for good
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.core.server_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        self.health.set(protocol.SERVICE_NAME, status)

    def begin_drain(self) -> None:
        self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def _reflection_pool() -> Any:
    """Our protocol lives in a private descriptor pool; reflection must also describe grpc.health."""
    pool = protocol.POOL
    try:
        pool.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        from google.protobuf import descriptor_pb2

        proto = descriptor_pb2.FileDescriptorProto()
        health_pb2.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool
