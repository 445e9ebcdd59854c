"""One forward pass's inputs as rank 0 sends them to the tensor-parallel workers.

Every integer input of a step (token ids, positions, slots, block tables, lengths) goes as one int32
tensor, broadcast with one collective (device to device under NCCL, so it waits for nothing on the
host); its :class:`StepHeader`, a few small integers, goes ahead of it on each worker's socket. The
ids are read after the runner has put the previous step's samples in, so a worker never needs the
sampled tokens themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pagedserve.engine.attention import AttentionMetadata


@dataclass(frozen=True)
class StepHeader:
    shapes: tuple[tuple[int, ...], ...]  # of the parts, in _PARTS order
    num_decode_tokens: int
    max_prefill_query_len: int
    max_context_len: int

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def pack_step(
    input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
) -> tuple[StepHeader, torch.Tensor]:
    parts = [
        input_ids,
        positions,
        md.slot_mapping,
        md.decode_block_tables,
        md.decode_context_lens,
        md.prefill_cu_seqlens_q,
        md.prefill_context_lens,
        md.prefill_block_tables,
    ]
    header = StepHeader(
        tuple(tuple(p.shape) for p in parts),
        md.num_decode_tokens,
        md.max_prefill_query_len,
        md.max_context_len,
    )
    return header, torch.cat([p.reshape(-1).to(torch.int32) for p in parts])


def unpack_step(
    header: StepHeader, flat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    sizes = [math.prod(shape) for shape in header.shapes]
    ids, positions, slots, decode_tables, decode_lens, cu_seqlens, prefill_lens, prefill_tables = (
        part.view(shape) for part, shape in zip(flat.split(sizes), header.shapes, strict=True)
    )
    metadata = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=header.num_decode_tokens,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        prefill_cu_seqlens_q=cu_seqlens,
        prefill_context_lens=prefill_lens,
        prefill_block_tables=prefill_tables,
        max_prefill_query_len=header.max_prefill_query_len,
        max_context_len=header.max_context_len,
    )
    return ids, positions, metadata
