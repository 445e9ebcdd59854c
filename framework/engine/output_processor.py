"""Turns sequences that received tokens into :class:`RequestOutput` values.

It owns one detokenizer per sequence, finds stop strings (telling the scheduler to finish those
sequences) and groups the sequences of a request into one output per step. A request with
``best_of`` > ``n`` runs ``best_of`` sequences and reports nothing until all have finished: then the
``n`` with the highest cumulative log-probability, whole, as one output (vLLM's choice). Prompt
log-probabilities go out with the first output after the prompt and again with the final one.
"""

from __future__ import annotations

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.outputs import CompletionOutput, RequestOutput, new_completions
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence
from pagedserve.models.tokenizer import Tokenizer


class RequestState:
    def __init__(self, request: EngineRequest, tokenizer: Tokenizer | None) -> None:
        self.request = request
        params = request.params
        self.detokenizers = [
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params)
            for _ in range(params.num_seqs)
        ]
        self.completions = new_completions(params.num_seqs, params.logprobs is not None)
        self.prompt_logprobs: list[dict[int, float] | None] | None = None  # once the prompt is done
        self.prompt_logprobs_reported = False

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    @property
    def picks_best(self) -> bool:
        return self.request.params.num_seqs > self.request.params.n

    def snapshot(self) -> RequestOutput | None:
        """This step's output; ``None`` while a best-of request is still running."""
        if self.picks_best and not self.finished:
            return None
        outputs = self._best() if self.picks_best else [c.copy() for c in self.completions]
        for c in self.completions:  # deltas are reported once
            c.text_delta, c.num_new_tokens = "", 0
        # In the first output after the prompt (for streams) and in the final one (for the rest).
        prompt_logprobs = None
        if not self.prompt_logprobs_reported or self.finished:
            prompt_logprobs = self.prompt_logprobs
            self.prompt_logprobs_reported = prompt_logprobs is not None
        request = self.request
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            outputs,
            self.finished,
            prompt_logprobs=prompt_logprobs,
        )

    def _best(self) -> list[CompletionOutput]:
        """The ``n`` best completions, renumbered, each carrying all its text and tokens as its delta."""
        ranked = sorted(self.completions, key=lambda c: -c.cumulative_logprob)[: self.request.params.n]
        best = []
        for index, completion in enumerate(ranked):
            copy = completion.copy()
            copy.index, copy.text_delta, copy.num_new_tokens = index, copy.text, len(copy.token_ids)
            best.append(copy)
        return best


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
        return [output for state in touched.values() if (output := self._emit(state)) is not None]

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
        if seq.index == 0 and not completion.token_ids and seq.params.prompt_logprobs is not None:
            state.prompt_logprobs = list(seq.prompt_logprobs)  # the prompt is done: report it once
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

    def _emit(self, state: RequestState) -> RequestOutput | None:
        output = state.snapshot()
        if state.finished:
            del self.states[state.request.request_id]
        return output
