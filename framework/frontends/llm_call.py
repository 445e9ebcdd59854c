"""One generation request to an LLM model through the core, in the Triton vLLM backend's terms.

The ``openai`` front-end (and anything else that speaks to LLM models in text) builds the same
``ModelInferRequest`` a tritonclient would send (``text_input``, ``stream``, ``sampling_parameters``,
the ``return_*`` flags), so the request is admitted, counted, traced and metered exactly like one
that came over gRPC. Its responses come back as typed :class:`Piece` objects, made from the model's
arrays in the thread the engine answers from (the request's response encoder), not through protobuf.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pagedserve.backend import ModelSpec
from pagedserve.codec import RequestOptions, response_tensors
from pagedserve.core import ServerCore
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.responder import Delivery, ServerResponder


@dataclass
class Piece:
    """One response: per choice (in choice order) the new text, its finish reason (None while
    running), how many tokens it added, and its token logprobs (vLLM backend JSON) if asked."""

    texts: list[str]
    finish_reasons: list[str | None]
    num_output_tokens: list[int]
    num_input_tokens: int
    logprobs: list[list[dict[str, Any]] | None] = field(default_factory=list)


class LLMCall:
    def __init__(
        self,
        core: ServerCore,
        model: str,
        prompt: str,
        sampling: dict[str, Any],
        *,
        stream: bool,
        logprobs: bool = False,
        add_special_tokens: bool = True,
        request_id: str = "",
        front_end: str = "OpenAI API",
    ) -> None:
        self.core = core
        self.front_end = front_end
        self.message = _infer_request(
            model, prompt, sampling, stream, logprobs, add_special_tokens, request_id
        )
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._responder: ServerResponder | None = None

    def start(self) -> None:
        """Admit the request (raises InferenceError when it cannot start)."""
        self._responder, _ = self.core.start_request(
            self.message, self._queue.put_nowait, self.front_end, piece_of
        )

    def cancel(self) -> None:
        """The client went away: the engine drops the request and frees its KV blocks."""
        if self._responder is not None:
            self._responder.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each response as it comes; raises the model's InferenceError if it fails."""
        while True:
            delivery = await self._queue.get()
            if delivery.error is not None:
                raise delivery.error
            if delivery.message is not None:
                yield delivery.message
            if delivery.final:
                return


def _infer_request(
    model: str,
    prompt: str,
    sampling: dict[str, Any],
    stream: bool,
    logprobs: bool,
    add_special_tokens: bool,
    request_id: str,
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    _add(message, "text_input", "BYTES").contents.bytes_contents.append(prompt.encode("utf-8"))
    _add(message, "sampling_parameters", "BYTES").contents.bytes_contents.append(
        json.dumps(sampling).encode()
    )
    flags = {
        "stream": stream,
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "return_logprobs": logprobs,
    }
    for name, value in flags.items():
        _add(message, name, "BOOL").contents.bool_contents.append(value)
    if not add_special_tokens:
        message.parameters["add_special_tokens"].bool_param = False
    return message


def _add(message: pb.ModelInferRequest, name: str, datatype: str) -> pb.ModelInferRequest.InferInputTensor:
    return message.inputs.add(name=name, datatype=datatype, shape=[1])


def piece_of(
    spec: ModelSpec, request: InferenceRequest, response: InferenceResponse, options: RequestOptions
) -> Piece:
    """The :data:`~pagedserve.codec.ResponseEncoder` of these requests: one response as a Piece."""
    arrays = {
        name: array.reshape(-1) for name, _, array, _ in response_tensors(spec, request, response, options)
    }
    texts = [_text(item) for item in arrays.get("text_output", ())]
    reasons = [_reason(item) for item in arrays.get("finish_reason", ())]
    counts = [int(n) for n in arrays.get("num_output_tokens", ())]
    num_input = arrays.get("num_input_tokens", ())
    logprobs = [json.loads(item) for item in arrays.get("logprobs", ())]
    return Piece(
        texts=texts,
        finish_reasons=reasons or [None] * len(texts),
        num_output_tokens=counts or [0] * len(texts),
        num_input_tokens=int(num_input[0]) if len(num_input) else 0,
        logprobs=logprobs or [None] * len(texts),
    )


def _text(item: bytes | str) -> str:
    return item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)


def _reason(raw: bytes | str) -> str | None:
    reason = _text(raw)
    return None if reason in ("None", "") else reason
