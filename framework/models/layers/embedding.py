"""Vocabulary-parallel token embedding and LM head (each rank owns a slice of the vocabulary).

A vocabulary that does not divide by the tensor-parallel size is padded: the last rank's slice has
rows past the vocabulary that no token id reaches and whose logits are cut off after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagedserve.models.parallel import all_reduce, gather_last_dim, tp_rank, tp_world_size
from torch import nn


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        param.data[:size].copy_(loaded.narrow(0, self.vocab_start, size))
        param.data[size:].zero_()  # padding past the vocabulary

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(y.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the whole vocabulary, on rank 0 (where the sampler runs):
    each rank multiplies by its slice of the vocabulary and rank 0 gathers the slices. The other ranks
    get their own slice back, which they do not use."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = gather_last_dim(F.linear(hidden, self.weight))
        return logits[:, : self.vocab_size]
