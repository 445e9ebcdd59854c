"""A validated, tokenized request on its way into the engine (built on the caller's thread)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


def build_request(
    tokenizer: Tokenizer | None,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    priority: int = 0,
    max_model_len: int | None = None,
) -> EngineRequest:
    """Tokenize ``prompt`` (and ``bad_words``), keep the last ``truncate_prompt_tokens`` of it (-1:
    as many as leave room to generate within ``max_model_len``); raises ``ValueError`` when it needs
    a tokenizer the model lacks. The engine checks the request against its limits when it is added."""
    params = params or SamplingParams()
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json; send token ids instead of text")
        token_ids = tokenizer.encode(prompt)
    else:
        token_ids = [int(t) for t in prompt]
    for needs_text, what in ((params.stop, "stop strings"), (params.bad_words, "bad_words")):
        if needs_text and tokenizer is None:
            raise ValueError(f"{what} need a tokenizer, and this model has no tokenizer.json")
    if params.structured_outputs is not None and tokenizer is None:
        raise ValueError("structured_outputs need a tokenizer, and this model has no tokenizer.json")
    if tokenizer is not None:
        params = params.with_tokenizer(tokenizer)
    keep = params.truncate_prompt_tokens
    if keep == -1 and max_model_len is not None:
        keep = max_model_len - 1
    if keep is not None and keep > 0:
        token_ids = token_ids[-keep:]
    return EngineRequest(request_id, token_ids, params, priority)
