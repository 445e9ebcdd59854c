"""The ``openai`` front-end: the OpenAI-compatible API (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``) over the LLM models, as vLLM's server answers it.

A completion or chat request becomes one generation request per prompt to the model's vLLM-backend
interface (:class:`~pagedserve.frontends.llm_call.LLMCall`); chat messages first go through the
model's chat template (:mod:`pagedserve.chat_template`). Streams are server-sent events ending in
``data: [DONE]``; errors are OpenAI's ``{"error": {...}}`` with the HTTP status. A client that
disconnects cancels its requests, which frees their KV blocks.
"""

from __future__ import annotations

import abc
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.chat_template import ChatTemplateError
from pagedserve.errors import InferenceError
from pagedserve.frontends.asgi import AsgiFrontend
from pagedserve.frontends.http_body import (
    BodyTooLarge,
    ClientGone,
    HttpError,
    dumps,
    parse_json,
    read_body,
    restricted_groups,
    restriction_refusal,
)
from pagedserve.frontends.llm_call import LLMCall, Piece
from pagedserve.frontends.openai_schema import ChatCompletionRequest, CompletionRequest
from pagedserve.model_manager import LoadedVersion
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# vLLM's extra sampling fields, passed to the model's sampling parameters as they are.
_PASS_THROUGH = (
    "n",
    "seed",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "bad_words",
    "allowed_token_ids",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "best_of",
)
_STATUS_TYPE = {
    403: "PermissionDeniedError",
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "CANCELLED": 499,
}
OWNED_BY = "pagedserve"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    @classmethod
    def of(cls, error: InferenceError) -> OpenAIError:
        return cls(_GRPC_TO_HTTP.get(error.code.name, 500), error.message)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict[str, Any]:
        kind = _STATUS_TYPE.get(self.status, "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class OpenAIFrontend(AsgiFrontend):
    name = "openai"
    port_key = "openai_port"
    service = "OpenAI API"

    def app(self) -> Starlette:
        # (path, method) -> (restricted-API group, handler); the groups are Triton's (docs/security.md).
        handlers = {
            ("/v1/models", "GET"): ("model-repository", self.list_models),
            ("/v1/models/{model:path}", "GET"): ("model-repository", self.get_model),
            ("/v1/completions", "POST"): ("inference", self.completions),
            ("/v1/chat/completions", "POST"): ("inference", self.chat_completions),
            ("/health", "GET"): ("health", self.health),
            ("/health/ready", "GET"): ("health", self.health),
        }
        restricted = restricted_groups(self.config.server)
        routes = [
            Route(path, _answering_errors(handler, group, restricted), methods=[method])
            for (path, method), (group, handler) in handlers.items()
        ]
        return Starlette(routes=routes)

    # -- models -----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if not self.core.server_ready():
            raise OpenAIError(503, "the server is not ready")
        return Response(status_code=200)

    def _llm_versions(self) -> list[LoadedVersion]:
        return [v for v in self.core.manager.ready_versions() if _is_llm(v)]

    async def list_models(self, request: Request) -> Response:
        seen: dict[str, LoadedVersion] = {}
        for version in self._llm_versions():
            seen.setdefault(version.spec.name, version)
        return JSONResponse({"object": "list", "data": [_model_card(v) for v in seen.values()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for version in self._llm_versions():
            if version.spec.name == name:
                return JSONResponse(_model_card(version))
        raise OpenAIError(404, f"The model `{name}` does not exist.", "model")

    def _resolve(self, name: str | None) -> LoadedVersion:
        versions = self._llm_versions()
        if name is None:
            if len({v.spec.name for v in versions}) == 1:
                return versions[0]  # as vLLM: one served model needs no name
            raise OpenAIError(400, "the request must name a model (GET /v1/models lists them)", "model")
        for version in versions:
            if version.spec.name == name:
                return version
        raise OpenAIError(404, f"The model `{name}` does not exist.", "model")

    # -- completions ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = _validated(CompletionRequest, await self._json(request))
        loaded = self._resolve(body.model)
        if body.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")
        if body.stream_options is not None and not body.stream:
            raise OpenAIError(400, "stream_options can only be set when stream is true", "stream_options")
        prompts = _prompts(body.prompt)
        sampling = _sampling(body, body.max_tokens, body.logprobs)
        calls = [
            LLMCall(
                self.core,
                loaded.spec.name,
                prompt,
                sampling,
                stream=body.stream,
                logprobs=body.logprobs is not None,
            )
            for prompt in prompts
        ]
        reply = _Reply("cmpl", "text_completion", loaded.spec.name, body.n)
        return await self._answer(request, calls, reply, _CompletionFormat(body, prompts))

    # -- chat -------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = _validated(ChatCompletionRequest, await self._json(request))
        loaded = self._resolve(body.model)
        if body.stream_options is not None and not body.stream:
            raise OpenAIError(400, "stream_options can only be set when stream is true", "stream_options")
        if body.chat_template is not None:
            # A template is a program: only the operator's (the model's files or YAML) may run.
            raise OpenAIError(
                400,
                "a chat_template in the request is not accepted; the model's own is used",
                "chat_template",
            )
        if body.add_generation_prompt and body.continue_final_message:
            raise OpenAIError(400, "add_generation_prompt and continue_final_message cannot both be true")
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
        prompt = self._render(loaded, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = getattr(loaded.policy.model, "max_model_len", None)  # the whole remaining context
        sampling = _sampling(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        call = LLMCall(
            self.core,
            loaded.spec.name,
            prompt,
            sampling,
            stream=body.stream,
            logprobs=body.logprobs,
            add_special_tokens=body.add_special_tokens,
        )
        reply = _Reply("chatcmpl", "chat.completion", loaded.spec.name, body.n)
        return await self._answer(request, [call], reply, _ChatFormat(body))

    def _render(self, loaded: LoadedVersion, body: ChatCompletionRequest) -> str:
        template = loaded.policy.model.chat_template()
        if template is None:
            raise OpenAIError(
                400,
                f"model '{loaded.spec.name}' has no chat template (no chat_template in its "
                "tokenizer_config.json, no chat_template.jinja); set one with the 'chat_template' parameter "
                "in its model YAML, or use /v1/completions",
            )
        messages = [_message(m) for m in body.messages]
        try:
            return template.render(
                messages,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                tools=body.tools,
                documents=body.documents,
                extra=body.chat_template_kwargs,
            )
        except ChatTemplateError as error:
            raise OpenAIError(400, str(error), "messages") from error

    # -- answering --------------------------------------------------------------------------------

    async def _json(self, request: Request) -> Any:
        try:
            body = await read_body(request.receive, request.headers, self.config.server.max_message_bytes)
            return parse_json(body)
        except HttpError as error:
            raise OpenAIError(
                413 if isinstance(error, BodyTooLarge) else error.status, error.message
            ) from error
        except ClientGone:
            raise OpenAIError(499, "the client closed the connection") from None

    async def _answer(self, request: Request, calls: list[LLMCall], reply: _Reply, form: _Format) -> Response:
        try:
            for call in calls:
                call.start()
        except InferenceError as error:
            for call in calls:
                call.cancel()
            raise OpenAIError.of(error) from error
        if form.stream:
            return StreamingResponse(_events(calls, reply, form), media_type="text/event-stream")
        collected = asyncio.ensure_future(_collect(calls))
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({collected, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if not collected.done():
            collected.cancel()
            for call in calls:
                call.cancel()
            return Response(status_code=499)
        try:
            pieces = collected.result()
        except InferenceError as error:
            raise OpenAIError.of(error) from error
        return JSONResponse(form.whole(reply, pieces))


class _Reply:
    """What every response and chunk of one request shares."""

    def __init__(self, prefix: str, kind: str, model: str, n: int) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.object = kind
        self.created = int(time.time())
        self.model = model
        self.n = n

    def envelope(self, object_name: str | None = None, **fields: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": object_name or self.object,
            "created": self.created,
            "model": self.model,
        }
        body.update(fields)
        return body


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Part:
    """One choice's share of an answer: ``index`` among all choices, ``prompt`` its prompt's index,
    ``first`` for the choice's first appearance, ``whole`` for a non-streamed answer."""

    index: int
    prompt: int
    text: str
    reason: str | None
    logprobs: list[dict[str, Any]]
    first: bool
    whole: bool


class _Format(abc.ABC):
    """How one API shapes choices; ``stream`` and the usage rule come from the request."""

    chunk_object = ""
    top: int | None = None
    """How many alternatives each token's logprobs list; None: no logprobs asked for."""

    def __init__(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self.body = body
        self.stream = body.stream
        options = body.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)

    def whole(self, reply: _Reply, per_prompt: list[list[Piece]]) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, pieces in enumerate(per_prompt):
            last = pieces[-1] if pieces else None
            prompt_tokens += last.num_input_tokens if last else 0
            for i in range(reply.n):
                text = "".join(piece.texts[i] for piece in pieces if i < len(piece.texts))
                reason = last.finish_reasons[i] if last and i < len(last.finish_reasons) else None
                logprobs = [
                    e for piece in pieces if i < len(piece.logprobs) for e in (piece.logprobs[i] or [])
                ]
                completion_tokens += sum(
                    piece.num_output_tokens[i] for piece in pieces if i < len(piece.num_output_tokens)
                )
                choices.append(self.choice(_Part(p * reply.n + i, p, text, reason, logprobs, True, True)))
        return reply.envelope(choices=choices, usage=_usage(prompt_tokens, completion_tokens))

    @abc.abstractmethod
    def choice(self, part: _Part) -> dict[str, Any]:
        """One choice of a response (``part.whole``) or of a stream chunk."""


class _CompletionFormat(_Format):
    chunk_object = "text_completion"

    def __init__(self, body: CompletionRequest, prompts: list[str]) -> None:
        super().__init__(body)
        self.prompts = prompts
        self.echo = body.echo
        self.top = body.logprobs

    def choice(self, part: _Part) -> dict[str, Any]:
        text = self.prompts[part.prompt] + part.text if self.echo and part.first else part.text
        logprobs = _completion_logprobs(part.logprobs, self.top) if self.top is not None else None
        return {
            "index": part.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": part.reason,
            "stop_reason": None,
        }


class _ChatFormat(_Format):
    chunk_object = "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest) -> None:
        super().__init__(body)
        self.top = (body.top_logprobs or 0) if body.logprobs else None

    def choice(self, part: _Part) -> dict[str, Any]:
        logprobs = {"content": _chat_logprobs(part.logprobs, self.top)} if self.top is not None else None
        choice: dict[str, Any] = {"index": part.index, "logprobs": logprobs, "finish_reason": part.reason}
        if part.whole:
            choice["message"] = {"role": "assistant", "content": part.text, "tool_calls": []}
            choice["stop_reason"] = None
        elif part.first:
            choice["delta"] = {"role": "assistant", "content": part.text}
        else:
            choice["delta"] = {"content": part.text}
        return choice


async def _collect(calls: list[LLMCall]) -> list[list[Piece]]:
    async def one(call: LLMCall) -> list[Piece]:
        return [piece async for piece in call.pieces()]

    return list(await asyncio.gather(*(one(call) for call in calls)))


async def _merged(calls: list[LLMCall]) -> AsyncIterator[tuple[int, Piece | BaseException]]:
    """Every call's pieces as ``(prompt index, piece)``, interleaved as they come; a call that fails
    gives its exception instead. One call is read directly (the common case: no task, no queue)."""
    if len(calls) == 1:
        try:
            async for piece in calls[0].pieces():
                yield 0, piece
        except Exception as error:  # noqa: BLE001 - delivered to the stream, then it ends
            yield 0, error
        return
    queue: asyncio.Queue[tuple[int, Piece | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, call: LLMCall) -> None:
        try:
            async for piece in call.pieces():
                await queue.put((p, piece))
        except BaseException as error:  # noqa: BLE001 - delivered to the stream, then it ends
            await queue.put((p, error))
            return
        await queue.put((p, None))

    pumps = [asyncio.ensure_future(pump(p, call)) for p, call in enumerate(calls)]
    try:
        running = len(calls)
        while running:
            p, item = await queue.get()
            if item is None:
                running -= 1
                continue
            yield p, item
    finally:
        for task in pumps:
            task.cancel()


async def _events(calls: list[LLMCall], reply: _Reply, form: _Format) -> AsyncIterator[bytes]:
    """Server-sent events for all prompts' choices, interleaved as they come; cancelling this
    generator (the client went away) cancels every request still running."""
    started: set[int] = set()
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    # Without logprobs a chunk has no float in it, so the fast JSON writer may write it.
    finite = form.top is None
    try:
        async for p, item in _merged(calls):
            if isinstance(item, BaseException):
                error = (
                    OpenAIError.of(item) if isinstance(item, InferenceError) else OpenAIError(500, str(item))
                )
                yield _event(error.body())
                break
            prompt_tokens[p] = item.num_input_tokens
            completion_tokens += sum(item.num_output_tokens)
            choices = []
            for i, text in enumerate(item.texts):
                index = p * reply.n + i
                reason = item.finish_reasons[i] if i < len(item.finish_reasons) else None
                if not text and reason is None and index in started:
                    continue
                logprobs = item.logprobs[i] if i < len(item.logprobs) else None
                part = _Part(index, p, text, reason, logprobs or [], index not in started, False)
                choices.append(form.choice(part))
                started.add(index)
            if choices:
                chunk = reply.envelope(form.chunk_object, choices=choices)
                if form.continuous_usage:
                    chunk["usage"] = _usage(sum(prompt_tokens.values()), completion_tokens)
                yield _event(chunk, finite)
        else:
            if form.include_usage:
                usage = _usage(sum(prompt_tokens.values()), completion_tokens)
                yield _event(reply.envelope(form.chunk_object, choices=[], usage=usage), True)
        yield b"data: [DONE]\n\n"
    finally:
        for call in calls:
            call.cancel()


def _event(body: dict[str, Any], finite: bool = False) -> bytes:
    return b"data: " + dumps(body, finite) + b"\n\n"


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _answering_errors(
    handler: Callable[[Request], Awaitable[Response]], group: str, restricted: dict[str, tuple[str, str]]
) -> Callable[[Request], Awaitable[Response]]:
    async def answer(request: Request) -> Response:
        refusal = restriction_refusal(restricted, group, request.headers)
        if refusal is not None:
            return OpenAIError(403, refusal).response()
        try:
            return await handler(request)
        except OpenAIError as error:
            return error.response()

    return answer


def _validated(schema: type[BaseModel], data: Any) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"{where}: {first['msg']}" if where else first["msg"], where or None) from None


def _is_llm(version: LoadedVersion) -> bool:
    inputs = {tensor.name for tensor in version.spec.config.input}
    outputs = {tensor.name for tensor in version.spec.config.output}
    return "text_input" in inputs and "sampling_parameters" in inputs and "text_output" in outputs


def _model_card(version: LoadedVersion) -> dict[str, Any]:
    return {
        "id": version.spec.name,
        "object": "model",
        "created": int(version.loaded_at),
        "owned_by": OWNED_BY,
    }


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise OpenAIError(400, "token id prompts are not supported; send the prompt as text", "prompt")


def _sampling(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        name: getattr(body, name) for name in _PASS_THROUGH if getattr(body, name) is not None
    }
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if logprobs is not None:
        params["logprobs"] = logprobs
    structured = _structured_outputs(body)
    if structured is not None:
        params["structured_outputs"] = structured
    return params


def _structured_outputs(body: CompletionRequest | ChatCompletionRequest) -> dict[str, Any] | None:
    """vLLM's spellings: ``structured_outputs``, the older ``guided_*`` fields, ``response_format``."""
    if body.structured_outputs is not None:
        return body.structured_outputs
    for field_name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(body, field_name)
        if value is not None:
            return {key: value}
    response_format = body.response_format
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return {"json_object": True}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            raise OpenAIError(400, "response_format.json_schema.schema is required", "response_format")
        return {"json": schema}
    raise OpenAIError(400, f"unknown response_format type {response_format.get('type')!r}", "response_format")


def _message(message: Any) -> dict[str, Any]:
    """A chat message as templates expect it: text content as one string (parts joined)."""
    data = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.type if hasattr(part, "type") else part.get("type")
            if kind != "text":
                raise OpenAIError(
                    400, f"message content of type {kind!r} is not supported (text only)", "messages"
                )
            texts.append(part.text if hasattr(part, "text") else str(part.get("text", "")))
        data["content"] = "\n".join(texts)
    return data


def _top(entry: dict[str, Any], count: int) -> list[tuple[str, float]]:
    ranked = sorted(entry.values(), key=lambda v: v["rank"])[:count]
    return [(v["decoded_token"], v["logprob"]) for v in ranked]


def _top_by_text(entry: dict[str, Any], count: int) -> dict[str, float]:
    """The legacy shape keys alternatives by their text; byte pieces of one character decode alike,
    and the better-ranked one keeps the key."""
    top: dict[str, float] = {}
    for text, logprob in _top(entry, count):
        top.setdefault(text, logprob)
    return top


def _completion_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """The legacy completions shape; the first key of each entry is the sampled token (vLLM's order)."""
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for entry in entries:
        sampled = next(iter(entry.values()))
        tokens.append(sampled["decoded_token"])
        token_logprobs.append(sampled["logprob"])
        tops.append(_top_by_text(entry, top) if top else None)
        offsets.append(offset)
        offset += len(sampled["decoded_token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for entry in entries:
        sampled = next(iter(entry.values()))
        item = token(sampled["decoded_token"], sampled["logprob"])
        item["top_logprobs"] = [token(t, lp) for t, lp in _top(entry, top)]
        content.append(item)
    return content
