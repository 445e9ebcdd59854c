"""BLS examples: python models that call other loaded models with Triton's ``pb_utils`` names.

* ``bls_add_sub`` (:class:`AddSubViaBls`): forwards INPUT0/INPUT1 to ``simple`` (or the model named by
  the optional MODEL_NAME input) with a blocking ``exec()``; the callee's error becomes its own.
* ``bls_add_sub_async`` (:class:`AsyncAddSubViaBls`): ``async def execute`` running two ``async_exec``
  calls side by side: OUTPUT0 = INPUT0 + INPUT1 from one, OUTPUT1 = INPUT1 - INPUT0 from the other.
* ``bls_llm_stream`` (:class:`StreamViaBls`, decoupled): streams ``tiny-llama``'s answer to PROMPT
  through ``exec(decoupled=True)``, one TEXT response per piece.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pagedserve_plugins.bls as pb_utils
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse


def _scalar_text(request: InferenceRequest, name: str, default: str) -> str:
    value = request.inputs.get(name)
    return default if value is None else bytes(value.reshape(-1)[0]).decode("utf-8", errors="replace")


def _add_sub_request(model_name: str, a: np.ndarray, b: np.ndarray) -> pb_utils.InferenceRequest:
    return pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=["OUTPUT0", "OUTPUT1"],
        inputs=[pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", b)],
    )


class AddSubViaBls:
    def execute(self, requests: list[InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            model = _scalar_text(request, "MODEL_NAME", "simple")
            call = _add_sub_request(model, request.inputs["INPUT0"], request.inputs["INPUT1"])
            answer = call.exec()
            if answer.has_error():  # Triton's pattern: hand the callee's error on
                responses.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            outputs = [pb_utils.get_output_tensor_by_name(answer, name) for name in ("OUTPUT0", "OUTPUT1")]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses


class AsyncAddSubViaBls:
    async def execute(self, requests: list[InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return list(await asyncio.gather(*(self._one(request) for request in requests)))

    async def _one(self, request: InferenceRequest) -> pb_utils.InferenceResponse:
        a, b = request.inputs["INPUT0"], request.inputs["INPUT1"]
        forward, backward = await asyncio.gather(
            _add_sub_request("simple", a, b).async_exec(), _add_sub_request("simple", b, a).async_exec()
        )
        for answer in (forward, backward):
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
        outputs = [
            pb_utils.get_output_tensor_by_name(forward, "OUTPUT0"),
            pb_utils.get_output_tensor_by_name(backward, "OUTPUT1"),
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)


class StreamViaBls:
    """Decoupled: one TEXT response per piece ``tiny-llama`` streams, then the final flag."""

    def execute(self, requests: list[InferenceRequest]) -> None:
        for request in requests:
            self._stream(request)

    def _stream(self, request: InferenceRequest) -> None:
        max_tokens = (
            int(request.inputs["MAX_TOKENS"].reshape(-1)[0]) if "MAX_TOKENS" in request.inputs else 16
        )
        sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0})
        call = pb_utils.InferenceRequest(
            model_name="tiny-llama",
            requested_output_names=["text_output"],
            inputs=[
                pb_utils.Tensor("text_input", request.inputs["PROMPT"].reshape(1)),
                pb_utils.Tensor("stream", np.array([True])),
                pb_utils.Tensor("sampling_parameters", np.array([sampling.encode()], dtype=np.object_)),
            ],
        )
        for piece in call.exec(decoupled=True):
            if piece.has_error():
                error = InferenceError.internal(piece.error().message())
                request.responder.send(InferenceResponse(error=error), final=True)
                return
            text = pb_utils.get_output_tensor_by_name(piece, "text_output")
            if text is not None:
                outputs = {"TEXT": np.array([b"".join(text.as_numpy().reshape(-1))], dtype=np.object_)}
                request.responder.send(InferenceResponse(outputs=outputs), final=False)
        request.responder.send(None, final=True)
