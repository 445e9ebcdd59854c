"""The gRPC front end: ``inference.GRPCInferenceService`` plus grpc.health.v1 and reflection.

Protocol in, typed objects out: requests are decoded by :mod:`pagedserve.codec`, handed to the
model's batching policy, and whatever the model sends comes back through a
:class:`~pagedserve.responder.ServerResponder`. Nothing here runs a model or blocks the loop.
Shared-memory regions, trace settings and log settings live in their own modules; the RPCs here only
translate their protobuf messages.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pagedserve import protocol
from pagedserve.call_guard import Malformed, RestrictedProtocols, add_guarded_service
from pagedserve.codec import RequestDecoder, RequestOptions, parse_infer_request, set_parameter
from pagedserve.config import ServeConfig, TlsConfig
from pagedserve.datatypes import of_tensor
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest
from pagedserve.log_settings import LogController
from pagedserve.model_manager import LoadedVersion, ModelManager
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import grpc_service_pb2_grpc as pb_grpc
from pagedserve.responder import Delivery, LoopMailbox, ServerResponder
from pagedserve.shared_memory import SharedMemoryManager
from pagedserve.statistics import Duration
from pagedserve.stream import StreamSession, sent
from pagedserve.tls import server_credentials
from pagedserve.tracing import Trace, Tracer, TraceSettings

log = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        config: ServeConfig,
        manager: ModelManager,
        tracer: Tracer | None = None,
        logs: LogController | None = None,
    ) -> None:
        self.config = config
        self.manager = manager
        self.live = True
        self.started = False
        self.exiting = False
        # One decoder per loaded version, forgotten with it (a reload makes new versions).
        self._decoders: weakref.WeakKeyDictionary[LoadedVersion, RequestDecoder] = weakref.WeakKeyDictionary()
        self._loop_mailbox: LoopMailbox | None = None
        self.shm = SharedMemoryManager(config.server.allow_client_shm, config.server.max_shm_regions)
        self.tracer = tracer or Tracer(TraceSettings(config.tracing), None)
        self.logs = logs or LogController(config.logging)

    # -- health and metadata ----------------------------------------------------------------------

    def server_ready(self) -> bool:
        if not self.started or self.exiting:
            return False
        return self.manager.all_ready() if self.config.server.strict_readiness else True

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.live)  # still live while draining: it is finishing work

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if not self.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Server not ready")
        ready = await self._call(context, self.manager.is_ready, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        server = self.config.server
        return pb.ServerMetadataResponse(
            name=server.name, version=server.version, extensions=server.extensions
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        loaded = await self._call(context, self.manager.resolve, request.name, request.version)
        config = loaded.spec.config
        versions = (
            [request.version]
            if request.version
            else [str(v.version) for v in self.manager.ready_versions(request.name)]
        )
        batch = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=loaded.spec.name, versions=versions, platform=config.platform or config.backend
        )
        for tensors, target in ((config.input, response.inputs), (config.output, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=of_tensor(tensor), shape=batch + list(tensor.dims))
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        loaded = await self._call(context, self.manager.resolve, request.name, request.version)
        return pb.ModelConfigResponse(config=loaded.spec.config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        loaded_versions = self.manager.ready_versions(request.name)
        if request.name and not loaded_versions:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"requested model '{request.name}' is not available"
            )
        if request.version:
            loaded_versions = [v for v in loaded_versions if str(v.version) == request.version]
            if not loaded_versions:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"requested model version is not available for model '{request.name}'",
                )
        response = pb.ModelStatisticsResponse()
        for loaded in loaded_versions:
            _fill_statistics(response.model_stats.add(), loaded)
        return response

    # -- repository -------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "'repository_name' specification is not supported"
            )
        response = pb.RepositoryIndexResponse()
        for row in self.manager.index(request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._check_model_control(context)
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
        await self._call(context, self.manager.load, request.model_name, override, blocking=True)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._check_model_control(context)
        param = request.parameters.get("unload_dependents")
        if param is not None and param.WhichOneof("parameter_choice") != "bool_param":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid value type for 'unload_dependents' parameter, expected bool_param.",
            )
        await self._call(context, self.manager.unload, request.model_name, None, blocking=True)
        return pb.RepositoryModelUnloadResponse()

    async def _check_model_control(self, context: Any) -> None:
        if self.config.model_control_mode.value != "explicit":
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "explicit model load / unload is not allowed if polling is enabled",
            )

    async def _call(
        self, context: Any, function: Callable[..., Any], *args: Any, blocking: bool = False
    ) -> Any:
        """Run a manager call (in a thread when it may block) and map InferenceError to a status."""
        try:
            if blocking:
                return await asyncio.get_running_loop().run_in_executor(None, function, *args)
            return function(*args)
        except InferenceError as error:
            await context.abort(error.code, error.message)

    # -- inference --------------------------------------------------------------------------------

    def _mailbox(self) -> LoopMailbox:
        loop = asyncio.get_running_loop()
        if self._loop_mailbox is None or self._loop_mailbox.loop is not loop:
            self._loop_mailbox = LoopMailbox(loop)
        return self._loop_mailbox

    def _decoder(self, loaded: LoadedVersion) -> RequestDecoder:
        decoder = self._decoders.get(loaded)
        if decoder is None:
            decoder = self._decoders[loaded] = RequestDecoder(loaded.spec, loaded.version)
        return decoder

    def start_request(
        self, message: pb.ModelInferRequest, deliver: Callable[[Delivery], None]
    ) -> tuple[ServerResponder, RequestOptions]:
        """Resolve, decode and queue one request; raise InferenceError if it cannot start."""
        if self.exiting:
            raise InferenceError.unavailable(
                "GRPC server is shutting down and has stopped accepting new requests."
            )
        arrival = time.monotonic_ns()
        loaded = self.manager.acquire(message.model_name, message.model_version)
        responder = ServerResponder(self._mailbox(), loaded, deliver)
        lease = self.shm.lease() if self.shm.enabled else None
        try:
            request, options = self._decoder(loaded).decode(message, responder, lease)
        except InferenceError as error:
            if lease is not None:
                lease.release()
            loaded.stats.record_failure(time.monotonic_ns() - arrival, error.failure_reason)
            loaded.release()
            raise
        request.timing.arrival_ns = arrival
        request.timing.compute_input_ns = time.monotonic_ns() - arrival
        responder.request = request
        responder.options, responder.lease = options, lease
        responder.trace = self._start_trace(loaded, message, request)
        self._submit(loaded, request, responder)
        return responder, options

    def _start_trace(
        self, loaded: LoadedVersion, message: pb.ModelInferRequest, request: InferenceRequest
    ) -> Trace | None:
        trace = self.tracer.start(loaded.spec.name, loaded.version, request.id, request.timing.arrival_ns)
        if trace is not None and trace.wants_tensors:
            for tensor in message.inputs:
                array = request.inputs[tensor.name]
                trace.record_tensor("TENSOR_QUEUE_INPUT", tensor.name, tensor.datatype, array)
        return trace

    @staticmethod
    def _submit(loaded: LoadedVersion, request: InferenceRequest, responder: ServerResponder) -> None:
        request.timing.queued_ns = time.monotonic_ns()
        try:
            loaded.policy.submit(request)
        except InferenceError as error:
            responder.fail(error)
        except Exception as error:  # noqa: BLE001 - a broken policy must not take the server down
            responder.fail(InferenceError.internal(str(error)))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        spec = self.manager.spec(request.model_name)
        if spec is not None and spec.decoupled and not _allows_unary(spec):
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
        stream = StreamSession(self.manager.spec, self.start_request)
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
        model = request.model_name
        if model and not await self._call(context, self.manager.is_ready, model, ""):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Request for unknown model : {model}")
        changes = {key: list(setting.value) for key, setting in request.settings.items()}
        if changes:
            await self._call(context, self.tracer.settings.update, model, changes)
        response = pb.TraceSettingResponse()
        for key, values in self.tracer.settings.render(model, self.tracer.exporter).items():
            response.settings[key].value.extend(values)
        return response

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        changes: dict[str, tuple[str | None, Any]] = {}
        for key, setting in request.settings.items():
            kind = setting.WhichOneof("parameter_choice")
            changes[key] = (kind, getattr(setting, kind) if kind else None)
        if changes:
            await self._call(context, self.logs.update, changes)
        response = pb.LogSettingsResponse()
        for key, (kind, value) in self.logs.render().items():
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


def _allows_unary(spec: Any) -> bool:
    """Our extension: decoupled models that answer a non-streaming request with exactly one response
    (the LLM backend with ``stream`` false) say so with this config parameter."""
    return spec.parameter("unary_decoupled", "false") == "true"


def _fill_statistics(stats: pb.ModelStatistics, loaded: LoadedVersion) -> None:
    snap = loaded.stats.snapshot()
    stats.name = loaded.spec.name
    stats.version = str(loaded.version)
    stats.last_inference = snap.last_inference_ms
    stats.inference_count = snap.inference_count
    stats.execution_count = snap.execution_count

    def put(target: pb.StatisticDuration, source: Duration) -> None:
        target.count, target.ns = source.count, source.ns

    inference = stats.inference_stats
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        put(getattr(inference, name), getattr(snap, name))
    inference.cache_hit.SetInParent()
    inference.cache_miss.SetInParent()
    for size, batch in snap.batches.items():
        entry = stats.batch_stats.add(batch_size=size)
        put(entry.compute_input, batch.compute_input)
        put(entry.compute_infer, batch.compute_infer)
        put(entry.compute_output, batch.compute_output)
    for index, response in snap.responses.items():
        entry = stats.response_stats[str(index)]
        for name in ("compute_infer", "compute_output", "success", "fail", "empty_response", "cancel"):
            put(getattr(entry, name), getattr(response, name))
    for kind, size in loaded.policy.model.memory_bytes().items():
        stats.memory_usage.add(type=kind, id=0, byte_size=size)


class BindError(OSError):
    """The gRPC port could not be bound; the message names the address and the key to change."""


class GrpcServer:
    """Owns the grpc.aio server and the health service's status."""

    def __init__(
        self,
        config: ServeConfig,
        manager: ModelManager,
        tracer: Tracer | None = None,
        logs: LogController | None = None,
    ) -> None:
        self.config = config
        self.servicer = InferenceServicer(config, manager, tracer, logs)
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
        self.port = self._bind(config.server.host, config.server.grpc_port, config.server.tls)

    def _bind(self, host: str, port: int, tls: TlsConfig) -> int:
        address = f"{host}:{port}"
        # grpcio neither says why a bind failed nor keeps quiet about it: probe with a plain socket.
        problem = _bind_problem(host, port)
        if problem is None:
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
        if problem.startswith("cannot resolve"):
            raise BindError(f"server.host: cannot listen on {address} ({problem})")
        raise BindError(
            f"server.grpc_port: cannot listen on {address} ({problem}); "
            "choose another port with server.grpc_port=<port> (0 picks a free one)"
        )

    async def start(self) -> None:
        await self.server.start()

    def mark_started(self) -> None:
        self.servicer.started = True
        self.update_health()

    def update_health(self) -> None:
        if self.servicer.exiting:
            return  # begin_drain set NOT_SERVING for good
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.servicer.server_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        self.health.set(protocol.SERVICE_NAME, status)

    def begin_drain(self) -> None:
        """Shutdown starts: health NOT_SERVING and ServerReady false at once, new inference
        UNAVAILABLE; requests already running go on."""
        self.servicer.exiting = True
        self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        self.begin_drain()
        await self.server.stop(grace)
        self.servicer.shm.close()


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (as grpcio binds it: address reuse on), or None."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve the host: {error.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                return error.strerror or str(error)
    return None


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


__all__ = ["BindError", "GrpcServer", "InferenceServicer", "json_format", "set_parameter"]
