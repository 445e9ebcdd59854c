"""Values that cross module boundaries: a sampled token, and what a request has produced so far."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Sample:
    """One sampled token for one sequence, with its log-probability (and the top ones if asked)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


@dataclass
class CompletionOutput:
    """One of the ``n`` sequences of a request.

    ``text`` is everything generated so far (cut at a stop string); ``text_delta`` is what this
    output adds to the previous one. ``logprobs`` has one ``{token_id: logprob}`` per generated token
    when the request asked for them.
    """

    index: int
    text: str = ""
    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_new_tokens: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def copy(self) -> CompletionOutput:
        """A snapshot whose lists later updates of ``self`` do not change."""
        logprobs = None if self.logprobs is None else list(self.logprobs)
        return dataclasses.replace(self, token_ids=list(self.token_ids), logprobs=logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None  # set when the engine refused or failed the request
    error_code: str = "INVALID_ARGUMENT"
    """With ``error``, the gRPC status name it deserves: INVALID_ARGUMENT for a request the engine
    refuses, INTERNAL when serving it failed, UNAVAILABLE when the engine went away."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``prompt_logprobs``: one entry per prompt token (the first is None), in the first output
    that follows the prompt's computation."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def merge_into(self, later: RequestOutput) -> RequestOutput:
        """``later`` extended to also carry this output's deltas (this one came first and was not
        delivered): a consumer that fell behind sends one response for both."""
        for mine, theirs in zip(self.outputs, later.outputs, strict=True):
            theirs.text_delta = mine.text_delta + theirs.text_delta
            theirs.num_new_tokens += mine.num_new_tokens
        later.prompt_logprobs = later.prompt_logprobs or self.prompt_logprobs
        return later


def new_completions(n: int, with_logprobs: bool) -> list[CompletionOutput]:
    """The ``n`` empty completions of a request that has produced nothing yet."""
    return [CompletionOutput(index=i, logprobs=[] if with_logprobs else None) for i in range(n)]


def merge_by_request(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request, in the order requests first appear: a request's later outputs absorb
    its earlier ones (deltas join), for a consumer that fell behind."""
    merged: dict[str, RequestOutput] = {}
    for output in outputs:
        earlier = merged.get(output.request_id)
        merged[output.request_id] = output if earlier is None else earlier.merge_into(output)
    return list(merged.values())
