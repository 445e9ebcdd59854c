"""A validated, tokenized request on its way into the engine (built on the caller's thread)."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
