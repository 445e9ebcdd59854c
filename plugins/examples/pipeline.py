"""``llm_preprocess`` and ``llm_postprocess``: the python ends of the ``llm_pipeline`` ensemble.

The ensemble (``conf/models/llm_pipeline.yaml``) runs preprocess → ``tiny-llama`` → postprocess, and
preprocess also feeds postprocess directly (a graph, not just a chain): each streamed piece of text
the LLM sends is post-processed with the one set of prompt ids.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse
from tokenizers import Tokenizer

DEFAULT_MAX_TOKENS = 16


@cache
def tiny_llama_tokenizer() -> Tokenizer:
    from pagedserve.models.tiny import ensure_tiny_llama

    return Tokenizer.from_file(str(ensure_tiny_llama() / "tokenizer.json"))


def _ids(text: bytes) -> np.ndarray:
    encoding = tiny_llama_tokenizer().encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)
    return np.array(encoding.ids, dtype=np.int32)


class PreprocessModel:
    """PROMPT (and optional MAX_TOKENS, STREAM) → the LLM's inputs: the prompt, greedy sampling
    parameters, the stream flag, prompt-only output; plus the prompt's token ids (INPUT_IDS)."""

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        return [self._one(request) for request in requests]

    def _one(self, request: InferenceRequest) -> InferenceResponse:
        prompt = request.inputs["PROMPT"].reshape(-1)[0]
        max_tokens = (
            int(request.inputs["MAX_TOKENS"].reshape(-1)[0])
            if "MAX_TOKENS" in request.inputs
            else DEFAULT_MAX_TOKENS
        )
        if not 1 <= max_tokens <= 4096:
            return InferenceResponse(
                error=InferenceError(f"MAX_TOKENS must be in [1, 4096], got {max_tokens}")
            )
        stream = bool(request.inputs["STREAM"].reshape(-1)[0]) if "STREAM" in request.inputs else False
        sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0})
        outputs = {
            "text_input": np.array([prompt], dtype=np.object_),
            "sampling_parameters": np.array([sampling.encode()], dtype=np.object_),
            "stream": np.array([stream]),
            "exclude_input_in_output": np.array([True]),
            "INPUT_IDS": _ids(prompt),
        }
        return InferenceResponse(outputs=outputs)


class PostprocessModel:
    """The LLM's text (a whole answer, or one streamed piece) → TEXT, its token ids (OUTPUT_IDS) and
    the prompt's length in tokens (NUM_INPUT_TOKENS)."""

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        responses = []
        for request in requests:
            text = b"".join(request.inputs["GENERATED"].reshape(-1))
            outputs = {
                "TEXT": np.array([text], dtype=np.object_),
                "OUTPUT_IDS": _ids(text),
                "NUM_INPUT_TOKENS": np.array([request.inputs["INPUT_IDS"].size], dtype=np.int32),
            }
            responses.append(InferenceResponse(outputs=outputs))
        return responses
