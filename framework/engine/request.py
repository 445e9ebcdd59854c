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
) -> EngineRequest:
    """Tokenize ``prompt``; raises ``ValueError`` when it needs a tokenizer the model lacks. The
    engine checks the request against its limits when it is added."""
    params = params or SamplingParams()
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json; send token ids instead of text")
        token_ids = tokenizer.encode(prompt)
    else:
        token_ids = [int(t) for t in prompt]
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer, and this model has no tokenizer.json")
    return EngineRequest(request_id, token_ids, params, priority)
