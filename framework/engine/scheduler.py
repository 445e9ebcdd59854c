"""Continuous batching: which sequences run this step, with how many tokens each.

There is no prefill or decode phase. Every sequence has ``num_computed_tokens`` and the scheduler
hands out tokens so that it catches up with its length: one token for a decode, a chunk of the
prompt for a prefill. Scheduling a batch advances ``num_computed_tokens`` at once and counts each
token the batch will sample as *pending*; :meth:`Scheduler.postprocess` later appends the sampled
tokens. So the engine may schedule step N+1 while step N still runs on the device: a sequence's
next input is then its pending token, which the runner reads on the device. A sequence whose
pending token already reaches ``max_tokens`` or the context limit is not scheduled again.

Running sequences go first (decodes before unfinished prefills), then waiting ones in policy order
while the token budget, ``max_num_seqs`` and the block pool allow. A request with ``n > 1`` takes
its ``n`` seats when it is admitted, before it forks. When the pool runs dry a running sequence is
preempted by recompute: its blocks are freed and it waits again with all its tokens, to be prefilled
anew (mostly from the prefix cache).

After a step that raised, :meth:`Scheduler.requeue_running` puts every running sequence back to
waiting the same way, and :attr:`Scheduler.only` lets the engine run one request at a time to find
the one that made the step fail.

The scheduler does not know about tensors, text or the model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.config import SchedulerConfig
from pagedserve.engine.outputs import Sample
from pagedserve.engine.policy import SchedulingPolicy
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What the runner computes this step.

    ``seqs[i]`` gets ``num_new_tokens[i]`` tokens starting at position ``start_positions[i]``.
    ``sample_rows`` pairs each sequence that receives a token with the index in ``seqs`` whose last
    position's logits it samples from (forked siblings sample from their parent's row).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample_rows: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0
    start_positions: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.start_positions:
            self.start_positions = [seq.num_computed_tokens for seq in self.seqs]
        self.num_tokens = sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.start_positions.append(seq.num_computed_tokens)
        self.num_tokens += num_new

    def remove(self, seq: Sequence) -> None:
        for i, scheduled in enumerate(self.seqs):
            if scheduled is seq:
                self.num_tokens -= self.num_new_tokens[i]
                del self.seqs[i], self.num_new_tokens[i], self.start_positions[i]
                return


@dataclass(frozen=True)
class RequestLimits:
    """What any request must fit, known once the engine is built (a parent process checks requests
    against it before sending them to the engine's process)."""

    max_num_seqs: int
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int | None = None

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request that could never be served."""
        self.check_params(params)
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, which leaves no room to "
                f"generate within the model context of {self.max_model_len} tokens"
            )
        worst = min(num_prompt_tokens + params.max_tokens, self.max_model_len)
        if -(-worst // self.block_size) > self.num_blocks:
            raise ValueError(
                f"the request needs up to {worst} tokens of KV cache but the whole cache "
                f"holds {self.num_blocks * self.block_size} ({self.num_blocks} blocks of "
                f"{self.block_size}); lower max_tokens or raise cache.num_blocks"
            )

    def check_params(self, params: SamplingParams) -> None:
        """The checks that need no prompt: run them before tokenizing."""
        if self.vocab_size is not None:
            params.check_token_ids(self.vocab_size)
        if params.num_seqs > self.max_num_seqs:
            key = "n" if params.best_of is None else "best_of"
            raise ValueError(
                f"sampling parameter {key} must be in [1, {self.max_num_seqs}] (scheduler.max_num_seqs: "
                f"its sequences run together), got {params.num_seqs}"
            )


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: SchedulingPolicy,
        *,
        max_model_len: int,
        eos_token_ids: frozenset[int] = frozenset(),
        vocab_size: int | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: list[Sequence] = []  # sorted by policy key
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.only: str | None = None
        """When set, schedule this request's sequences and no other (the others keep their state)."""
        self.limits = RequestLimits(
            config.max_num_seqs, max_model_len, block_manager.num_blocks, block_manager.block_size, vocab_size
        )

    # ---- requests --------------------------------------------------------------------------------

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request that could never be served."""
        self.limits.check(num_prompt_tokens, params)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.policy.key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` now and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in self.running + self.waiting if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def requeue_running(self) -> list[str]:
        """After a step that raised: every running sequence waits again without blocks, as after a
        preemption, and nothing is pending any more (the failed step's samples never arrive).
        Returns the requests that may have been in the failed step, in running order."""
        suspects = [s.request_id for s in self.running]
        suspects += [s.request_id for s in self.waiting if s.num_pending_tokens]  # preempted in it
        for seq in self.running:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            self.add(seq)
        self.running = []
        for seq in self.waiting:
            seq.num_pending_tokens = 0
        return list(dict.fromkeys(suspects))

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work and advance every scheduled sequence's progress (tokens pending)."""
        batch = ScheduledBatch()
        self._schedule_running(batch)
        if batch.num_preempted == 0:
            self._schedule_waiting(batch, self.config.max_num_batched_tokens - batch.num_tokens)
        self._fork_and_mark_sampling(batch)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
        for seq, _ in batch.sample_rows:
            seq.num_pending_tokens += 1
        return batch

    def postprocess(self, batch: ScheduledBatch, samples: list[Sample]) -> list[Sequence]:
        """Append sampled tokens, cache full blocks, finish sequences that hit a token-level stop.

        Returns the sequences that received a token; a sequence that finished (stop, abort) while
        this batch ran gets nothing.
        """
        updated = []
        for (seq, _), sample in zip(batch.sample_rows, samples, strict=True):
            if seq.is_finished:
                continue
            seq.num_pending_tokens -= 1
            seq.append_token(sample.token_id, sample.logprob, sample.top_logprobs)
            updated.append(seq)
        for seq in batch.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)
        for seq in updated:
            reason = self._stop_reason(seq)
            if reason is not None and not seq.is_finished:
                self.finish(seq, reason)
        return updated

    # ---- internals -------------------------------------------------------------------------------

    def _schedule_running(self, batch: ScheduledBatch) -> None:
        copies: dict[int, list[tuple[int, int]]] = {}
        # Decodes first so a long prefill chunk never starves them of budget.
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            budget = self.config.max_num_batched_tokens - batch.num_tokens  # a preemption may refund
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or self._stops_on_pending_token(seq):
                continue  # preempted earlier in this loop, or done once its pending token lands
            if self.only is not None and seq.request_id != self.only:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            seq_copies = self._allocate_or_preempt(seq, num_new, batch, copies)
            if seq_copies is None:
                continue
            copies[id(seq)] = seq_copies
            batch.add(seq, num_new)
        batch.block_copies = [pair for seq in batch.seqs for pair in copies.get(id(seq), [])]

    def _allocate_or_preempt(
        self,
        seq: Sequence,
        num_new: int,
        batch: ScheduledBatch,
        copies: dict,
    ) -> list[tuple[int, int]] | None:
        while (seq_copies := self.block_manager.allocate_slots(seq, num_new)) is None:
            victim = self.policy.select_victim(self.running)
            batch.remove(victim)
            copies.pop(id(victim), None)
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is seq:
                return None
        return seq_copies

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        pool = self.block_manager
        # A parent that has not forked yet holds the seats of the children it will fork.
        seats = sum(_seats(seq) for seq in self.running)
        for seq in [s for s in self.waiting if self.only in (None, s.request_id)]:
            if budget <= 0 or seats + _seats(seq) > self.config.max_num_seqs:
                break
            # Prompt log-probabilities need every prompt position computed, none read from the cache.
            cached = [] if seq.params.prompt_logprobs is not None else pool.find_cached_prefix(seq)
            remaining = len(seq) - len(cached) * pool.block_size
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.chunked_prefill:
                break
            seq_copies = pool.allocate_slots(seq, num_new, cached, num_reserve_tokens=remaining)
            if seq_copies is None:
                break
            self.waiting.remove(seq)
            seats += _seats(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            batch.block_copies.extend(seq_copies)
            budget -= num_new

    def _fork_and_mark_sampling(self, batch: ScheduledBatch) -> None:
        # Forking happens only once no more preemption can occur in this step, so children never
        # share blocks whose KV this step will not compute.
        for row, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.num_computed_tokens + num_new < len(seq) + seq.num_pending_tokens:
                continue  # a prompt chunk that is not the last one
            batch.sample_rows.append((seq, row))
            if not seq.is_forked:
                batch.sample_rows.extend((child, row) for child in self._fork(seq, num_new))

    def _fork(self, parent: Sequence, num_new: int) -> list[Sequence]:
        parent.is_forked = True
        children = []
        for index in range(1, parent.params.num_seqs):
            child = parent.fork(index)
            child.num_computed_tokens = parent.num_computed_tokens + num_new
            self.block_manager.fork(parent, child)
            self.running.append(child)
            children.append(child)
        return children

    def _stops_on_pending_token(self, seq: Sequence) -> bool:
        if not seq.num_pending_tokens:
            return False
        num_tokens = len(seq) + seq.num_pending_tokens
        return (
            seq.num_output_tokens + seq.num_pending_tokens >= seq.params.max_tokens
            or num_tokens >= self.max_model_len
        )

    def _stop_reason(self, seq: Sequence) -> str | None:
        params, last = seq.params, seq.token_ids[-1]
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop"
        if seq.num_output_tokens >= params.min_tokens and (
            (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids
        ):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None


def _seats(seq: Sequence) -> int:
    return 1 if seq.is_forked else seq.params.num_seqs
