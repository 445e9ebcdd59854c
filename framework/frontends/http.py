"""The ``http`` front-end: KServe v2 REST with Triton's extensions, on port ``server.http_port``.

Routes, methods, status codes and ``{"error": ...}`` bodies follow Triton's ``http_server.cc``: the
same path patterns, matched in the same order, each route answering 405 to other methods and
unknown paths 404 ``Not Found``. Every route belongs to a restricted-API group; a group named in
``server.restricted_protocols`` answers only requests carrying the header ``<key>: <value>`` (403
otherwise), Triton's ``--http-restricted-api``. Inference lives in :mod:`.http_inference`; this
module answers the rest from the shared core and knows no tensors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from pagedserve.config import ServerConfig
from pagedserve.core import ServerCore
from pagedserve.errors import InferenceError
from pagedserve.frontends.asgi import AsgiFrontend
from pagedserve.frontends.http_body import (
    ClientGone,
    HttpError,
    Receive,
    error_response,
    json_response,
    parse_json,
    read_body,
    restricted_groups,
    restriction_refusal,
    status_of,
)
from pagedserve.frontends.http_inference import InferenceRoutes
from starlette.responses import Response
from starlette.types import Scope, Send

log = logging.getLogger(__name__)

# Triton's path patterns (HTTPAPIServer's constructor), matched whole.
_MODEL = re.compile(
    r"/v2/models/([^/]+)(?:/versions/([0-9]+))?"
    r"(?:/(infer|generate|generate_stream|ready|config|stats|trace/setting))?"
)
_HEALTH = re.compile(r"/v2/health/(live|ready)")
_SHM = re.compile(
    r"/v2/(systemsharedmemory|cudasharedmemory)(?:/region/([^/]+))?/(status|register|unregister)"
)
_REPOSITORY = re.compile(r"/v2/repository(?:/([^/]+))?/(index|models/([^/]+)/(load|unload))")
_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


class HttpRequest:
    """What a route needs of one request."""

    __slots__ = ("headers", "method", "receive")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        # uvicorn hands header names over lower-cased.
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.receive = receive

    async def json(self, core: ServerCore) -> Any:
        """The JSON body, or None when there is none."""
        body = await read_body(self.receive, self.headers, core.config.server.max_message_bytes)
        return parse_json(body) if body.strip() else None


Handler = Callable[..., Awaitable[Any]]


class HttpApp:
    """The ASGI application: Triton's dispatch over the shared core."""

    def __init__(self, core: ServerCore, server: ServerConfig) -> None:
        self.core = core
        self.restricted = restricted_groups(server)
        self.inference = InferenceRoutes(core)
        self._model_routes = {
            kind: (group, methods, getattr(self, handler))
            for kind, (group, methods, handler) in _MODEL_ROUTES.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = HttpRequest(scope, receive)
        try:
            response = await self._dispatch(scope["path"], request)
        except HttpError as error:
            response = error_response(error.message, error.status)
        except InferenceError as error:
            response = error_response(error.message, status_of(error))
        except ClientGone:
            return
        except Exception:  # noqa: BLE001 - a bug answers 500 with a line, never a traceback
            log.exception("HTTP %s %s failed", request.method, scope["path"])
            response = error_response("internal error: the request failed; see the server log", 500)
        await response(scope, receive, send)

    def _dispatch(self, path: str, request: HttpRequest) -> Awaitable[Any]:
        """The route's handler call for ``path`` (not awaited here: a request awaits one coroutine
        of the route rather than a chain of them, which costs at every resumption)."""
        if path == "/v2/models/stats":
            return self._route(request, "statistics", ("GET",), self.statistics, "", "")
        if path == "/v2/logging":
            return self._route(request, "logging", ("GET", "POST"), self.logging)
        if match := _MODEL.fullmatch(path):
            model, version, kind = match.groups("")
            if kind != "trace/setting" or not version:
                group, methods, handler = self._model_routes[kind]
                return self._route(request, group, methods, handler, model, version)
        elif path == "/v2":
            return self._route(request, "metadata", ("GET",), self.server_metadata)
        elif match := _HEALTH.fullmatch(path):
            return self._route(request, "health", ("GET",), self.health, match.group(1))
        elif match := _SHM.fullmatch(path):
            kind, region, action = match.groups()
            methods = ("GET",) if action == "status" else ("POST",)
            return self._route(
                request, "shared-memory", methods, self.shared_memory, kind, region or "", action
            )
        elif match := _REPOSITORY.fullmatch(path):
            repository, kind, model, action = match.groups()
            handler = self.repository_index if kind == "index" else self.repository_control
            args = (repository or "",) if kind == "index" else (repository or "", model, action)
            return self._route(request, "model-repository", ("POST",), handler, *args)
        elif path == "/v2/trace/setting":
            return self._route(request, "trace", ("GET", "POST"), self.trace, "")
        return _answered(error_response("Not Found", 404))

    def _route(
        self, request: HttpRequest, group: str, methods: tuple[str, ...], handler: Handler, *args: str
    ) -> Awaitable[Any]:
        refusal = restriction_refusal(self.restricted, group, request.headers)
        if refusal is not None:
            return _answered(error_response(refusal, 403))
        if request.method not in methods:
            return _answered(error_response("Method Not Allowed", 405))
        return handler(request, *args)

    # -- health and metadata ----------------------------------------------------------------------

    async def health(self, request: HttpRequest, kind: str) -> Response:
        ok = self.core.live if kind == "live" else self.core.server_ready()
        return Response(status_code=200 if ok else 400)

    async def server_metadata(self, request: HttpRequest) -> Response:
        return json_response(message_json(self.core.server_metadata()))

    async def model_ready(self, request: HttpRequest, model: str, version: str) -> Response:
        if not self.core.model_ready(model, version):
            return error_response("Model version not ready", 400)
        return Response(status_code=200)

    async def model_metadata(self, request: HttpRequest, model: str, version: str) -> Response:
        return json_response(message_json(self.core.model_metadata(model, version)))

    async def model_config(self, request: HttpRequest, model: str, version: str) -> Response:
        return json_response(message_json(self.core.model_config(model, version).config))

    async def statistics(self, request: HttpRequest, model: str, version: str) -> Response:
        return json_response(message_json(self.core.model_statistics(model, version)))

    # -- inference --------------------------------------------------------------------------------

    def infer(self, request: HttpRequest, model: str, version: str) -> Awaitable[Any]:
        return self.inference.infer(request.headers, request.receive, model, version)

    def generate(self, request: HttpRequest, model: str, version: str) -> Awaitable[Any]:
        return self.inference.generate(request.headers, request.receive, model, version, streaming=False)

    def generate_stream(self, request: HttpRequest, model: str, version: str) -> Awaitable[Any]:
        return self.inference.generate(request.headers, request.receive, model, version, streaming=True)

    async def model_trace(self, request: HttpRequest, model: str, version: str) -> Response:
        return await self.trace(request, model)

    # -- repository -------------------------------------------------------------------------------

    async def repository_index(self, request: HttpRequest, repository: str) -> Response:
        _no_repository_name(repository)
        body = _object(await request.json(self.core))
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError("Invalid value for 'ready': expected a boolean")
        rows = []
        for row in self.core.repository_index(ready):
            entry = {"name": row.name}
            for key in ("version", "state", "reason"):
                if getattr(row, key):
                    entry[key] = getattr(row, key)
            rows.append(entry)
        return json_response(rows)

    async def repository_control(
        self, request: HttpRequest, repository: str, model: str, action: str
    ) -> Response:
        _no_repository_name(repository)
        self.core.check_model_control()
        params = _object(_object(await request.json(self.core)).get("parameters"), "parameters")
        if action == "load":
            await self.core.load(model, _load_override(model, params))
        else:
            if "unload_dependents" in params and not isinstance(params["unload_dependents"], bool):
                raise HttpError("Unable to parse 'unload_dependents': expected a boolean")
            await self.core.unload(model)
        return Response(status_code=200, media_type="application/json")

    # -- shared memory ----------------------------------------------------------------------------

    async def shared_memory(self, request: HttpRequest, kind: str, region: str, action: str) -> Response:
        shm = self.core.shm
        cuda = kind == "cudasharedmemory"
        if action == "status":
            regions = shm.status("cuda" if cuda else "system", region)
            if cuda:
                return json_response(
                    [{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in regions]
                )
            return json_response(
                [
                    {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                    for r in regions
                ]
            )
        shm.check_enabled()
        if action == "unregister":
            await _blocking(shm.unregister, "cuda" if cuda else "system", region)
            return Response(status_code=200, media_type="application/json")
        label = "cuda" if cuda else "system"
        if not region:
            raise HttpError(f"'region name' is necessary to register {label} shared memory region")
        body = _object(await request.json(self.core))
        if cuda:
            await _blocking(shm.register_cuda, region, *_cuda_registration(body))
        else:
            shm.register_system(region, *_system_registration(body))
        return Response(status_code=200, media_type="application/json")

    # -- tracing and logging ----------------------------------------------------------------------

    async def trace(self, request: HttpRequest, model: str) -> Response:
        changes: dict[str, list[str]] = {}
        if request.method == "POST":
            for key, value in _object(await request.json(self.core)).items():
                changes[key] = _trace_values(key, value)
        settings = self.core.trace_setting(model, changes)
        return json_response(
            {
                key: values if key == "trace_level" or len(values) != 1 else values[0]
                for key, values in settings.items()
            }
        )

    async def logging(self, request: HttpRequest) -> Response:
        changes: dict[str, tuple[str | None, Any]] = {}
        if request.method == "POST":
            for key, value in _object(await request.json(self.core)).items():
                if value is not None:  # Triton skips nulls
                    changes[key] = _log_value(key, value)
        settings = self.core.log_settings(changes)
        return json_response({key: value for key, (_, value) in settings.items()})


# kind of /v2/models/... -> (restricted group, methods, handler)
_MODEL_ROUTES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "": ("metadata", ("GET",), "model_metadata"),
    "ready": ("health", ("GET",), "model_ready"),
    "config": ("model-config", ("GET",), "model_config"),
    "stats": ("statistics", ("GET",), "statistics"),
    "infer": ("inference", ("POST",), "infer"),
    "generate": ("inference", ("POST",), "generate"),
    "generate_stream": ("inference", ("POST",), "generate_stream"),
    "trace/setting": ("trace", ("GET", "POST"), "model_trace"),
}


async def _answered(response: Response) -> Response:
    """A route's answer known without awaiting anything, as the awaitable ``_dispatch`` returns."""
    return response


async def _blocking(function: Callable[..., Any], *args: Any) -> Any:
    """Calls that may initialise CUDA (seconds) stay off the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _object(value: Any, key: str = "request") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HttpError(f"Unable to parse '{key}': expected a JSON object")
    return value


def _no_repository_name(repository: str) -> None:
    if repository:
        raise HttpError("'repository_name' specification is not supported", 501)


def _load_override(model: str, params: dict[str, Any]) -> str | None:
    override: str | None = None
    for key, value in params.items():
        if not isinstance(value, str):
            raise HttpError(f"Unable to parse '{key}': expected a string")
        if key == "config":
            override = value
        elif key.startswith("file:"):
            raise HttpError(f"failed to load '{model}', failed to poll from model repository", 500)
        else:
            raise HttpError(f"unrecognized load parameter '{key}'.")
    return override


def _uint_field(body: dict[str, Any], key: str, required: bool = True) -> int:
    if key not in body:
        if required:
            raise HttpError(f"Shared memory register request has no '{key}' field")
        return 0
    value = body[key]
    if type(value) is not int or not 0 <= value < 2**64:
        raise HttpError(f"Unable to parse '{key}': expected an unsigned integer")
    return value


def _system_registration(body: dict[str, Any]) -> tuple[str, int, int]:
    if "key" not in body:
        raise HttpError("Shared memory register request has no 'key' field")
    if not isinstance(body["key"], str):
        raise HttpError("Unable to parse 'key': expected a string")
    return body["key"], _uint_field(body, "offset", required=False), _uint_field(body, "byte_size")


def _cuda_registration(body: dict[str, Any]) -> tuple[bytes, int, int]:
    handle = body.get("raw_handle")
    if handle is None:
        raise HttpError("Shared memory register request has no 'raw_handle' field")
    if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
        raise HttpError("Unable to parse 'raw_handle': expected an object with a base64 string 'b64'")
    try:
        raw = base64.b64decode(handle["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise HttpError("'raw_handle' must be a valid base64 encoded cudaIpcMemHandle_t") from None
    if len(raw) != 64:
        raise HttpError("'raw_handle' must be a valid base64 encoded cudaIpcMemHandle_t")
    return raw, _uint_field(body, "device_id"), _uint_field(body, "byte_size")


def _trace_values(key: str, value: Any) -> list[str]:
    """A trace setting from JSON: null clears it (an empty list for the core), else strings."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise HttpError(f"Unable to parse '{key}': expected a string or an array of strings")
    return values


def _log_value(key: str, value: Any) -> tuple[str | None, Any]:
    """A log setting as (protobuf oneof field, value) for the core, which checks the kinds."""
    if isinstance(value, bool):
        return "bool_param", value
    if type(value) is int and 0 <= value < 2**32:
        return "uint32_param", value
    if isinstance(value, str):
        return "string_param", value
    raise HttpError(f"Unable to parse '{key}': expected a boolean, an unsigned integer or a string")


# -- protobuf as Triton's JSON -----------------------------------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    """``message`` as Triton writes it over HTTP: every field, 64-bit integers as numbers (protobuf's
    JSON mapping writes them as strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, data)
    return data


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> None:
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                _map_numbers(field.message_type.fields_by_name["value"], value)
            else:
                for item in value if isinstance(value, list) else [value]:
                    _numbers(field.message_type, item)
        elif field.type in _INT64:
            data[key] = [int(v) for v in value] if isinstance(value, list) else int(value)


def _map_numbers(field: FieldDescriptor, mapping: dict[str, Any]) -> None:
    for key, value in mapping.items():
        if field.message_type is not None:
            _numbers(field.message_type, value)
        elif field.type in _INT64:
            mapping[key] = int(value)


class HttpFrontend(AsgiFrontend):
    """``http``: KServe v2 REST plus Triton's extensions (generate, shared memory, repository, ...)."""

    name = "http"
    port_key = "http_port"
    service = "HTTPService"

    def app(self) -> HttpApp:
        return HttpApp(self.core, self.config.server)
