"""Logits → tokens, for a batch of sequences with their own sampling parameters.

Order of operations, vLLM V1's (docs/sampling.md): raw log-probabilities (what ``logprobs``
reports) → the structured-output grammar's token bitmask → ``allowed_token_ids`` → ``bad_words`` →
``min_tokens`` masking of stop tokens and ``logit_bias`` → penalties → greedy argmax, or
temperature, min-p, top-k, top-p and a random draw. The draw is ``argmax(probs / E)`` with
``E ~ Exp(1)`` per vocabulary entry (the exponential race, equivalent to sampling from ``probs``),
taken from the sequence's own generator when the request has a ``seed``, so its text does not depend
on what else is in the batch.

:meth:`Sampler.sample` only queues device work (no ``torch.multinomial``, no host reads of device
values); the caller copies :attr:`SamplerOutput.packed` to the host once per step and turns it into
:class:`Sample` values with :meth:`Sampler.to_samples`, which also advances each sequence's grammar.
Masks are built on the host from short lists (token ids, the grammar bitmask) and applied to the
whole batch on the device at once; nothing loops over the vocabulary in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pagedserve.engine.outputs import Sample
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.structured_output import apply_bitmask, grammar_bitmask


@dataclass
class SamplerOutput:
    """Device tensors of one step's draw."""

    token_ids: torch.Tensor  # [B] int64, stays on the device (the next step's input ids)
    packed: torch.Tensor  # [B, 2] float64: token id, its log-probability (what goes to the host)
    top_ids: torch.Tensor | None = None  # [B, k] when some row asked for top log-probabilities
    top_logprobs: torch.Tensor | None = None  # [B, k]


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] (1.0 for greedy rows, which never use it)
    top_k: torch.Tensor  # [B] int, vocab size when off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    is_greedy: torch.Tensor  # [B] bool


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int], seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.seed = seed
        self._shared: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        """``logits`` ``[B, V]``, row ``i`` for ``seqs[i]``; returns one sample per row (waits)."""
        out = self.sample(logits, seqs)
        top = None
        if out.top_ids is not None:
            top = (out.top_ids.tolist(), out.top_logprobs.tolist())
        return self.to_samples(out.packed.cpu(), top, seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """Queue the draw on the logits' device; nothing here waits for the device."""
        logits = logits[:, : self.vocab_size].float()
        # The reported log-probability is the model's, before penalties and truncation.
        log_norm = torch.logsumexp(logits, dim=-1)
        top_ids = top_logprobs = None
        k = max((s.params.logprobs or 0 for s in seqs if s.params.logprobs is not None), default=None)
        if k:
            top_logprobs, top_ids = (logits - log_norm[:, None]).topk(min(k, logits.shape[1]), dim=-1)
        raw = logits.clone() if any(_changes_logits(s.params) for s in seqs) else logits
        logits = self._apply_grammars(logits, seqs)
        logits = self._apply_allowed_token_ids(logits, seqs)
        logits = self._mask_bad_words(logits, seqs)
        logits = self._mask_early_stops(logits, seqs)
        logits = self._apply_logit_bias(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        token_ids = self._choose(logits, seqs)
        chosen = raw.gather(1, token_ids[:, None])[:, 0] - log_norm
        packed = torch.stack((token_ids.double(), chosen.double()), dim=1)
        return SamplerOutput(token_ids, packed, top_ids, top_logprobs)

    def to_samples(
        self,
        packed: torch.Tensor,
        top: tuple[list[list[int]], list[list[float]]] | None,
        seqs: list[Sequence],
    ) -> list[Sample]:
        """Host values of :attr:`SamplerOutput.packed` (and the top log-probabilities) → samples."""
        rows = packed.tolist()
        samples = []
        for i, seq in enumerate(seqs):
            token_id, logprob = int(rows[i][0]), rows[i][1]
            if seq.grammar is not None and not seq.is_finished and not seq.grammar.accept(token_id):
                # The bitmask allowed only tokens the grammar accepts: this is a bug, not bad input.
                raise RuntimeError(f"the grammar of {seq.request_id} rejected its sampled token {token_id}")
            top_logprobs = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top_logprobs = dict(zip(top[0][i][:k], top[1][i][:k], strict=True)) if top else {}
                top_logprobs[token_id] = logprob
            samples.append(Sample(token_id, logprob, top_logprobs))
        return samples

    def prompt_logprobs(self, logits: torch.Tensor, next_ids: torch.Tensor, k: int) -> list[dict[int, float]]:
        """``logits`` ``[T, V]`` of prompt positions, ``next_ids`` ``[T]`` the prompt tokens they
        predict: per position the next token's raw log-probability and the top ``k`` (waits)."""
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], next_ids[:, None][:, :0])
        entries = []
        for ids, values, token_id, logprob in zip(
            top_ids.tolist(), top_values.tolist(), next_ids.tolist(), chosen, strict=True
        ):
            entry = dict(zip(ids, values, strict=True))
            entry[token_id] = logprob
            entries.append(entry)
        return entries

    # ---- logits processing -----------------------------------------------------------------------

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(s.grammar is None for s in seqs):
            return logits
        bitmask, rows = grammar_bitmask([s.grammar for s in seqs], logits.shape[1])
        apply_bitmask(logits, bitmask, rows)
        return logits

    def _apply_allowed_token_ids(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            allowed = seq.params.allowed_token_ids
            if allowed is not None:
                rows += [i] * len(allowed)
                cols += allowed
        if not rows:
            return logits
        device = logits.device
        row_ids = sorted(set(rows))
        keep = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        keep[_to_device(rows, torch.long, device), _to_device(cols, torch.long, device)] = True
        index = _to_device(row_ids, torch.long, device)
        logits[index] = logits[index].masked_fill(~keep[index], float("-inf"))
        return logits

    def _mask_bad_words(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            for ids in seq.params.bad_words_token_ids:
                # Ban a word's last token once the tokens before it are the output's last ones.
                prefix = ids[:-1]
                if not prefix or seq.output_token_ids[-len(prefix) :] == prefix:
                    rows.append(i)
                    cols.append(ids[-1])
        return _fill(logits, rows, cols, float("-inf"))

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols, values = [], [], []
        for i, seq in enumerate(seqs):
            for token_id, bias in (seq.params.logit_bias or {}).items():
                rows.append(i)
                cols.append(token_id)
                values.append(bias)
        if rows:
            device = logits.device
            index = (_to_device(rows, torch.long, device), _to_device(cols, torch.long, device))
            logits.index_put_(index, _to_device(values, logits.dtype, device), accumulate=True)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if _has_penalty(s.params)]
        for i in rows:
            logits[i] = self._penalise(logits[i], seqs[i])
        return logits

    def _penalise(self, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        params, device = seq.params, row.device
        if params.repetition_penalty != 1.0:
            seen = _to_device(sorted(set(seq.token_ids)), torch.long, device)
            values = row[seen]
            row[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
        if seq.num_output_tokens and (params.presence_penalty or params.frequency_penalty):
            output = _to_device(seq.output_token_ids, torch.long, device)
            counts = torch.bincount(output, minlength=row.numel())[: row.numel()].to(row.dtype)
            row = (
                row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(row.dtype)
            )
        return row

    def _mask_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            # A finished grammar allows only the stop tokens: min_tokens cannot hold it open.
            if seq.num_sampled_before_step < seq.params.min_tokens and seq.grammar is None:
                stops = set(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    stops |= self.eos_token_ids
                ids = [t for t in stops if t < logits.shape[1]]
                rows += [i] * len(ids)
                cols += ids
        return _fill(logits, rows, cols, float("-inf"))

    # ---- choosing --------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if all(s.params.is_greedy for s in seqs):
            return greedy
        batch = self._sampling_batch(seqs, logits.device)
        probs = _truncated_probs(logits, batch)
        noise = self._exponential_noise(seqs, probs.shape, probs.device)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.is_greedy, greedy, sampled)

    def _sampling_batch(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        params = [s.params for s in seqs]
        vocab = self.vocab_size
        return SamplingBatch(
            temperature=_to_device([p.temperature or 1.0 for p in params], torch.float32, device),
            top_k=_to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device),
            top_p=_to_device([p.top_p for p in params], torch.float32, device),
            min_p=_to_device([p.min_p for p in params], torch.float32, device),
            is_greedy=_to_device([p.is_greedy for p in params], torch.bool, device),
        )

    def _exponential_noise(
        self, seqs: list[Sequence], shape: torch.Size, device: torch.device
    ) -> torch.Tensor:
        noise = torch.ones(shape, device=device)
        shared = [i for i, s in enumerate(seqs) if not s.params.is_greedy and s.params.seed is None]
        if shared:  # one draw for every unseeded row
            rows = torch.empty(len(shared), shape[1], device=device)
            noise[_to_device(shared, torch.long, device)] = rows.exponential_(
                generator=self._shared_generator(device)
            )
        for i, seq in enumerate(seqs):
            if not seq.params.is_greedy and seq.params.seed is not None:
                noise[i].exponential_(generator=self._seeded_generator(seq, device))
        return noise.clamp_(min=1e-20)  # a zero draw would turn a removed token's 0/0 into NaN

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._shared is None:
            self._shared = torch.Generator(device=device).manual_seed(self.seed)
        return self._shared

    def _seeded_generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.generator is None:
            # Siblings of an n > 1 request get distinct, reproducible streams.
            seed = seq.params.seed if seq.index == 0 else hash((seq.params.seed, seq.index)) & (2**63 - 1)
            seq.generator = torch.Generator(device=device).manual_seed(seed)
        return seq.generator


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the device (an asynchronous copy)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _fill(logits: torch.Tensor, rows: list[int], cols: list[int], value: float) -> torch.Tensor:
    if rows:
        device = logits.device
        logits[_to_device(rows, torch.long, device), _to_device(cols, torch.long, device)] = value
    return logits


def _changes_logits(params: SamplingParams) -> bool:
    """Whether the row's logits change before the draw (so the raw ones need a copy); masks only
    remove tokens that then cannot be drawn, so they may work in place."""
    return _has_penalty(params) or bool(params.logit_bias)


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _truncated_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after temperature, min-p, top-k and top-p, in that order (vLLM V1's: min-p is
    relative to the most likely token, then top-p counts mass over what min-p and top-k kept);
    removed entries are exactly 0."""
    logits = logits / batch.temperature[:, None]
    probs = logits.softmax(dim=-1)
    threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    logits = logits.masked_fill(probs < threshold, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= batch.top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= batch.top_p[:, None], 0.0)
    return torch.empty_like(sorted_probs).scatter_(1, order, sorted_probs)
