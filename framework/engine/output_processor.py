"""Turns sequences that received tokens into :class:`RequestOutput` values.

It owns one detokenizer per sequence, finds stop strings (telling the scheduler to finish those
sequences) and groups the ``n`` sequences of a request into one output per step.
"""

from __future__ import annotations

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.outputs import RequestOutput, new_completions
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence
from pagedserve.models.tokenizer import Tokenizer


class RequestState:
    def __init__(self, request: EngineRequest, tokenizer: Tokenizer | None) -> None:
        self.request = request
        n = request.params.n
        self.detokenizers = [
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, request.params) for _ in range(n)
        ]
        self.completions = new_completions(n, request.params.logprobs is not None)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def snapshot(self) -> RequestOutput:
        outputs = [c.copy() for c in self.completions]
        for c in self.completions:  # deltas are reported once
            c.text_delta, c.num_new_tokens = "", 0
        return RequestOutput(self.request.request_id, self.request.prompt_token_ids, outputs, self.finished)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request: EngineRequest) -> None:
        self.states[request.request_id] = RequestState(request, self.tokenizer)

    def has(self, request_id: str) -> bool:
        return request_id in self.states

    def process(self, seqs: list[Sequence], scheduler: Scheduler) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        for seq in seqs:
            state = self.states[seq.request_id]
            self._update(state, seq, scheduler)
            touched[seq.request_id] = state
        return [self._emit(state) for state in touched.values()]

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.states.get(request_id)
        if state is None:
            return None
        for completion in state.completions:
            if completion.finish_reason is None:
                completion.finish_reason = "abort"
        return self._emit(state)

    def _update(self, state: RequestState, seq: Sequence, scheduler: Scheduler) -> None:
        completion = state.completions[seq.index]
        new_tokens = seq.token_ids[seq.num_prompt_tokens + len(completion.token_ids) :]
        delta, hit_stop = state.detokenizers[seq.index].update(new_tokens, seq.is_finished)
        if hit_stop and not seq.is_finished:
            scheduler.finish(seq, "stop")
        elif hit_stop:
            seq.finish_reason = "stop"  # the stop string wins over a length limit reached at once
        completion.token_ids.extend(new_tokens)
        completion.num_new_tokens += len(new_tokens)
        completion.text = state.detokenizers[seq.index].emitted_text
        completion.text_delta += delta
        completion.cumulative_logprob = seq.cumulative_logprob
        if completion.logprobs is not None:
            completion.logprobs.extend(seq.logprobs[len(completion.logprobs) :])
        completion.finish_reason = seq.finish_reason

    def _emit(self, state: RequestState) -> RequestOutput:
        output = state.snapshot()
        if output.finished:
            del self.states[state.request.request_id]
        return output
