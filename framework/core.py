"""The server core every front-end shares: models, shared memory, tracing, log settings, readiness.

A front-end (gRPC, HTTP, OpenAI) translates its protocol into calls on one :class:`ServerCore`; the
core answers with typed objects (the inference protobuf messages are the common currency) or raises
:class:`~pagedserve.errors.InferenceError`, which each front-end maps onto its own status codes. So a
request counts the same in statistics, metrics and traces whichever front-end it came through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pagedserve.codec import RequestOptions, ResponseEncoder, encode_response
from pagedserve.config import ServeConfig
from pagedserve.datatypes import of_tensor
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest
from pagedserve.log_settings import LogController
from pagedserve.model_manager import IndexEntry, LoadedVersion, ModelManager
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.responder import Delivery, LoopMailbox, ServerResponder
from pagedserve.shared_memory import SharedMemoryManager
from pagedserve.statistics import Duration
from pagedserve.tracing import Trace, Tracer, TraceSettings


class ServerCore:
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
        self._loop_mailbox: LoopMailbox | None = None
        self.shm = SharedMemoryManager(config.server.allow_client_shm, config.server.max_shm_regions)
        self.tracer = tracer or Tracer(TraceSettings(config.tracing), None)
        self.logs = logs or LogController(config.logging)

    # -- health and metadata ----------------------------------------------------------------------

    def server_ready(self) -> bool:
        if not self.started or self.exiting:
            return False
        return self.manager.all_ready() if self.config.server.strict_readiness else True

    def model_ready(self, name: str, version: str) -> bool:
        if not self.started:
            raise InferenceError.unavailable("Server not ready")
        return self.manager.is_ready(name, version)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        server = self.config.server
        return pb.ServerMetadataResponse(
            name=server.name, version=server.version, extensions=server.extensions
        )

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        loaded = self.manager.resolve(name, version)
        config = loaded.spec.config
        versions = [version] if version else [str(v.version) for v in self.manager.ready_versions(name)]
        batch = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=loaded.spec.name, versions=versions, platform=config.platform or config.backend
        )
        for tensors, target in ((config.input, response.inputs), (config.output, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=of_tensor(tensor), shape=batch + list(tensor.dims))
        return response

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.manager.resolve(name, version).spec.config)

    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        loaded_versions = self.manager.ready_versions(name)
        if name and not loaded_versions:
            raise InferenceError(f"requested model '{name}' is not available")
        if version:
            loaded_versions = [v for v in loaded_versions if str(v.version) == version]
            if not loaded_versions:
                raise InferenceError(f"requested model version is not available for model '{name}'")
        response = pb.ModelStatisticsResponse()
        for loaded in loaded_versions:
            fill_statistics(response.model_stats.add(), loaded)
        return response

    # -- repository -------------------------------------------------------------------------------

    def repository_index(self, ready_only: bool) -> list[IndexEntry]:
        return self.manager.index(ready_only)

    def check_model_control(self) -> None:
        if self.config.model_control_mode.value != "explicit":
            raise InferenceError.unavailable(
                "explicit model load / unload is not allowed if polling is enabled"
            )

    async def load(self, name: str, override: str | None) -> None:
        """Explicit load, with an optional config override (JSON); blocks a worker thread, not the loop."""
        self.check_model_control()
        await asyncio.get_running_loop().run_in_executor(None, self.manager.load, name, override)

    async def unload(self, name: str) -> None:
        self.check_model_control()
        await asyncio.get_running_loop().run_in_executor(None, self.manager.unload, name, None)

    # -- inference --------------------------------------------------------------------------------

    def _mailbox(self) -> LoopMailbox:
        mailbox = self._loop_mailbox
        if mailbox is None or not mailbox.serves_this_thread():
            self._loop_mailbox = mailbox = LoopMailbox(asyncio.get_running_loop())
        return mailbox

    def start_request(
        self,
        message: pb.ModelInferRequest,
        deliver: Callable[[Delivery], None],
        front_end: str = "Server",
        encoder: ResponseEncoder = encode_response,
        deliver_early: bool = False,
    ) -> tuple[ServerResponder, RequestOptions]:
        """Resolve, decode and queue one request; raise InferenceError if it cannot start.

        ``deliver`` is called on the event loop with each response (or the error), the last marked
        final; ``encoder`` makes each response's message where the model sends it. ``front_end``
        names the server in Triton's shutting-down message ("GRPC server", ...). ``deliver_early``:
        ``deliver`` only queues, so it may run before this returns (a model run on the loop may
        answer within the call); otherwise the answer waits for the next loop turn."""
        if self.exiting:
            raise InferenceError.unavailable(
                f"{front_end} is shutting down and has stopped accepting new requests."
            )
        arrival = time.monotonic_ns()
        loaded = self.manager.acquire(message.model_name, message.model_version)
        responder = ServerResponder(self._mailbox(), loaded, deliver, encoder, deliver_early)
        lease = self.shm.lease() if self.shm.enabled else None
        try:
            request, options = loaded.decoder.decode(message, responder, lease)
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
        loaded.submit(request)
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

    # -- tracing and logging ----------------------------------------------------------------------

    def trace_setting(self, model: str, changes: dict[str, list[str]]) -> dict[str, list[str]]:
        if model and not self.manager.is_ready(model, ""):
            raise InferenceError(f"Request for unknown model : {model}")
        if changes:
            self.tracer.settings.update(model, changes)
        return self.tracer.settings.render(model, self.tracer.exporter)

    def log_settings(self, changes: dict[str, tuple[str | None, Any]]) -> dict[str, tuple[str, Any]]:
        """``changes`` maps a setting to (kind, value), kind being the protobuf oneof's field name
        (``bool_param``, ``uint32_param``, ``string_param``) or None when no value was given."""
        if changes:
            self.logs.update(changes)
        return self.logs.render()


def allows_unary(spec: Any) -> bool:
    """Our extension: decoupled models that answer a non-streaming request with exactly one response
    (the LLM backend with ``stream`` false) say so with this config parameter."""
    return spec.parameter("unary_decoupled", "false") == "true"


def fill_statistics(stats: pb.ModelStatistics, loaded: LoadedVersion) -> None:
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
