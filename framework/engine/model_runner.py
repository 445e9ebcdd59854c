"""Runs one scheduled batch: block copies, input tensors, attention metadata, forward, sampling.

Rows are laid out decodes first (one token each), then prefill chunks, which is the order
:class:`AttentionMetadata` promises the backends. Only the last position of each sequence that
samples this step goes through the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pagedserve.engine.attention import AttentionBackend, AttentionMetadata, attention_metadata
from pagedserve.engine.outputs import Sample
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.scheduler import ScheduledBatch
from pagedserve.engine.sequence import Sequence
from pagedserve.models.registry import ModelArchitecture


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata
    last_rows: list[int]  # per batch index: row of the sequence's last token this step


class ModelRunner:
    def __init__(
        self,
        model: ModelArchitecture,
        backend: AttentionBackend,
        sampler: Sampler,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.block_size = block_size
        self.device = device
        layers = model.attention_layers()
        first = layers[0]
        shape = (len(layers), num_blocks, block_size, first.num_kv_heads, first.head_dim)
        self.k_caches = torch.empty(shape, dtype=dtype, device=device)
        self.v_caches = torch.empty(shape, dtype=dtype, device=device)
        for i, layer in enumerate(layers):
            layer.backend, layer.k_cache, layer.v_cache = backend, self.k_caches[i], self.v_caches[i]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[Sample]:
        self.copy_blocks(batch.block_copies)
        inputs = self.prepare(batch)
        with attention_metadata(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if not batch.sample_rows:
            return []
        rows = torch.tensor([inputs.last_rows[i] for _, i in batch.sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        return self.sampler(logits, [seq for seq, _ in batch.sample_rows])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.k_caches[:, dst] = self.k_caches[:, src]
        self.v_caches[:, dst] = self.v_caches[:, src]

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        # Stable sort: decodes (one new token) first, the rest keep their order.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows = [0] * len(batch.seqs)
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            token_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            slots += self._slots(seq, start, start + num_new)
            last_rows[i] = len(token_ids) - 1
        num_decodes = sum(1 for i in order if batch.num_new_tokens[i] == 1)
        metadata = self._metadata(batch, order, num_decodes, slots)
        to = self._tensor
        return ModelInputs(to(token_ids, torch.long), to(positions, torch.long), metadata, last_rows)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _metadata(
        self, batch: ScheduledBatch, order: list[int], num_decodes: int, slots: list[int]
    ) -> AttentionMetadata:
        decodes, prefills = order[:num_decodes], order[num_decodes:]
        seqs, num_new = batch.seqs, batch.num_new_tokens
        context_lens = {i: seqs[i].num_computed_tokens + num_new[i] for i in order}
        cu_seqlens = [0]
        for i in prefills:
            cu_seqlens.append(cu_seqlens[-1] + num_new[i])
        to = self._tensor
        return AttentionMetadata(
            slot_mapping=to(slots, torch.long),
            num_decode_tokens=num_decodes,
            decode_block_tables=self._block_tables([seqs[i] for i in decodes]),
            decode_context_lens=to([context_lens[i] for i in decodes], torch.int32),
            prefill_cu_seqlens_q=to(cu_seqlens, torch.int32),
            prefill_context_lens=to([context_lens[i] for i in prefills], torch.int32),
            prefill_block_tables=self._block_tables([seqs[i] for i in prefills]),
            max_prefill_query_len=max((num_new[i] for i in prefills), default=0),
            max_context_len=max(context_lens.values(), default=0),
        )

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max((len(s.block_table) for s in seqs), default=0)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._tensor(rows, torch.int32).reshape(len(seqs), width)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
