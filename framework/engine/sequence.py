"""One token stream being generated: its tokens, KV progress, block table and scheduling state.

A request with ``n > 1`` starts as one sequence; when its prompt is done the scheduler forks the
other ``n - 1`` from it (sharing its KV blocks). The sequence knows nothing about text.
"""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch
from pagedserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.structured_output import SequenceGrammar

_arrival_counter = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then output), how many of them have KV in the cache, and their blocks."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        index: int = 0,
        arrival: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.arrival = next(_arrival_counter) if arrival is None else arrival
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is computed or scheduled to be
        self.num_pending_tokens = 0  # sampled on the device, not yet appended to token_ids
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the last admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids
        self.num_hashed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.is_forked = params.num_seqs == 1
        self.finish_reason: str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        self.generator: torch.Generator | None = None
        self.num_preemptions = 0
        self.grammar: SequenceGrammar | None = None  # set by the engine for structured outputs
        # One entry per prompt token once computed ([0] is None: nothing predicts the first token).
        self.prompt_logprobs: list[dict[int, float] | None] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.name}, tokens={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def seq_key(self) -> tuple[str, int]:
        return (self.request_id, self.index)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def num_sampled_before_step(self) -> int:
        """Output tokens that precede the one being sampled now (the newest pending token)."""
        return self.num_output_tokens + max(self.num_pending_tokens - 1, 0)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, top_logprobs: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if top_logprobs is not None:
            self.logprobs.append(top_logprobs)

    def fork(self, index: int) -> Sequence:
        """A sibling sharing everything generated so far; the caller shares the KV blocks."""
        child = Sequence(
            self.request_id,
            self.token_ids[: self.num_prompt_tokens],
            self.params,
            priority=self.priority,
            index=index,
            arrival=self.arrival,
        )
        child.token_ids = list(self.token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.is_forked = True
        child.grammar = None if self.grammar is None else self.grammar.fresh()
        return child
