"""Logits → tokens, for a batch of sequences with their own sampling parameters.

Order of operations: raw log-probabilities (what ``logprobs`` reports) → penalties → ``min_tokens``
masking of stop tokens → greedy argmax, or temperature, top-k, top-p, min-p and a random draw.
The draw is ``argmax(probs / E)`` with ``E ~ Exp(1)`` per vocabulary entry (the exponential race,
equivalent to sampling from ``probs``), taken from the sequence's own generator when the request
has a ``seed``, so its text does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pagedserve.engine.outputs import Sample
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence


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
        """``logits`` ``[B, V]``, row ``i`` for ``seqs[i]``; returns one sample per row."""
        logits = logits[:, : self.vocab_size].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits, seqs)
        logits = self._mask_early_stops(logits, seqs)
        token_ids = self._choose(logits, seqs)
        return self._to_samples(token_ids, logprobs, seqs)

    # ---- logits processing -----------------------------------------------------------------------

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if _has_penalty(s.params)]
        for i in rows:
            logits[i] = self._penalise(logits[i], seqs[i])
        return logits

    def _penalise(self, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        params, device = seq.params, row.device
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=device)
            values = row[seen]
            row[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
        if seq.num_output_tokens and (params.presence_penalty or params.frequency_penalty):
            output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            counts = torch.bincount(output, minlength=row.numel())[: row.numel()].to(row.dtype)
            row = (
                row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(row.dtype)
            )
        return row

    def _mask_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                stops = set(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    stops |= self.eos_token_ids
                ids = [t for t in stops if t < logits.shape[1]]
                logits[i, ids] = float("-inf")
        return logits

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
            temperature=torch.tensor([p.temperature or 1.0 for p in params], device=device),
            top_k=torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            min_p=torch.tensor([p.min_p for p in params], device=device),
            is_greedy=torch.tensor([p.is_greedy for p in params], device=device),
        )

    def _exponential_noise(
        self, seqs: list[Sequence], shape: torch.Size, device: torch.device
    ) -> torch.Tensor:
        noise = torch.ones(shape, device=device)
        for i, seq in enumerate(seqs):
            if not seq.params.is_greedy:
                noise[i].exponential_(generator=self._generator_for(seq, device))
        return noise.clamp_(min=1e-20)  # a zero draw would turn a removed token's 0/0 into NaN

    def _generator_for(self, seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.params.seed is None:
            if self._shared is None:
                self._shared = torch.Generator(device=device).manual_seed(self.seed)
            return self._shared
        if seq.generator is None:
            # Siblings of an n > 1 request get distinct, reproducible streams.
            seed = seq.params.seed if seq.index == 0 else hash((seq.params.seed, seq.index)) & (2**63 - 1)
            seq.generator = torch.Generator(device=device).manual_seed(seed)
        return seq.generator

    # ---- results ---------------------------------------------------------------------------------

    def _to_samples(
        self, token_ids: torch.Tensor, logprobs: torch.Tensor, seqs: list[Sequence]
    ) -> list[Sample]:
        chosen = logprobs.gather(1, token_ids[:, None])[:, 0].tolist()
        token_list = token_ids.tolist()
        samples = []
        for i, seq in enumerate(seqs):
            top = None
            if seq.params.logprobs is not None:
                top = _top_logprobs(logprobs[i], seq.params.logprobs)
                top[token_list[i]] = chosen[i]
            samples.append(Sample(token_list[i], chosen[i], top))
        return samples


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _truncated_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p; removed entries are exactly 0."""
    logits = logits / batch.temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= batch.top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= batch.top_p[:, None], 0.0)
    sorted_probs = sorted_probs.masked_fill(sorted_probs < batch.min_p[:, None] * sorted_probs[:, :1], 0.0)
    return torch.empty_like(sorted_probs).scatter_(1, order, sorted_probs)


def _top_logprobs(row: torch.Tensor, k: int) -> dict[int, float]:
    if k == 0:
        return {}
    values, ids = row.topk(min(k, row.numel()))
    return dict(zip(ids.tolist(), values.tolist(), strict=True))
