"""One step's integer model inputs, built on the host and sent to the device in one copy.

Every integer input of a step (input ids, positions, slot mapping, context lengths, query offsets,
the rows to sample, block tables, and which input ids are tokens that only the device has yet) lives
in one int32 buffer with fixed sections. On CUDA the host side is pinned memory, two copies used in
turn so that filling one never races the copy out of the other, and the device buffer is filled by
one asynchronous copy of the used prefix (the block tables come last, so a small batch copies
little). On CPU the host buffer is used directly. Views of the device buffer keep fixed addresses,
which is what CUDA graphs need.

Rows are laid out decodes first (one token each), then prefill chunks, which is the order
:class:`AttentionMetadata` promises the backends. This module knows nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pagedserve.engine.attention import AttentionMetadata
from pagedserve.engine.scheduler import ScheduledBatch
from pagedserve.engine.sequence import Sequence

_SECTIONS = ("input_ids", "positions", "slots", "context_lens", "cu_seqlens", "sample_rows", "gather")


@dataclass
class StepInputs:
    """Device views for one step; ``num_padded`` rows when a captured graph runs it."""

    input_ids: torch.Tensor  # [num_padded] int32
    positions: torch.Tensor  # [num_padded] int32
    metadata: AttentionMetadata
    sample_rows: torch.Tensor | None  # [num_samples] rows of the hidden states; None: rows 0..n-1
    num_samples: int
    num_tokens: int
    num_padded: int
    is_decode_only: bool
    last_rows: list[int] = field(default_factory=list)  # per batch.seqs[i]: the row of its last token


class StepBuffers:
    """The persistent buffers and the code that fills them from a :class:`ScheduledBatch`."""

    def __init__(
        self,
        *,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.width = max_blocks_per_seq
        sizes = {
            "input_ids": max_num_tokens,
            "positions": max_num_tokens,
            "slots": max_num_tokens,
            "context_lens": max_num_seqs,
            "cu_seqlens": max_num_seqs + 1,
            "sample_rows": max_num_seqs,
            "gather": 2 * max_num_seqs,  # [dst rows..., src rows...]
        }
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in _SECTIONS:
            self.offsets[name] = offset
            offset += sizes[name]
        self.block_tables_offset = offset
        self.size = offset + max_num_seqs * max_blocks_per_seq
        self.sizes = sizes
        on_cuda = device.type == "cuda"
        self.hosts = [
            torch.zeros(self.size, dtype=torch.int32, pin_memory=on_cuda) for _ in range(2 if on_cuda else 1)
        ]
        self.copied = [torch.cuda.Event() if on_cuda else None for _ in self.hosts]
        self.device_buffer = torch.zeros(self.size, dtype=torch.int32, device=device) if on_cuda else None
        self._turn = 0

    # ---- views -----------------------------------------------------------------------------------

    def device_view(self, name: str, length: int, start: int = 0) -> torch.Tensor:
        buffer = self.device_buffer if self.device_buffer is not None else self.hosts[0]
        begin = self.offsets[name] + start
        return buffer[begin : begin + length]

    def device_block_tables(self, first_row: int, num_rows: int) -> torch.Tensor:
        buffer = self.device_buffer if self.device_buffer is not None else self.hosts[0]
        table = buffer[self.block_tables_offset :].view(self.max_num_seqs, self.width)
        return table[first_row : first_row + num_rows]

    def decode_metadata(self, num_rows: int) -> AttentionMetadata:
        """Metadata of a decode-only batch of ``num_rows`` rows over the fixed buffers (for graphs)."""
        return AttentionMetadata(
            slot_mapping=self.device_view("slots", num_rows),
            num_decode_tokens=num_rows,
            decode_block_tables=self.device_block_tables(0, num_rows),
            decode_context_lens=self.device_view("context_lens", num_rows),
            prefill_cu_seqlens_q=self.device_view("cu_seqlens", 1),
            prefill_context_lens=self.device_view("context_lens", 0, num_rows),
            prefill_block_tables=self.device_block_tables(num_rows, 0),
            max_prefill_query_len=0,
            max_context_len=self.width * self.block_size,
        )

    def fill_dummy_decode(self, num_rows: int) -> None:
        """Harmless decode inputs for ``num_rows`` rows (graph capture): nothing is stored, one token read."""
        host = self._next_host()
        self._section(host, "input_ids")[:num_rows] = 0
        self._section(host, "positions")[:num_rows] = 0
        self._section(host, "slots")[:num_rows] = -1
        self._section(host, "context_lens")[:num_rows] = 1
        self._section(host, "cu_seqlens")[:1] = 0
        self._block_tables(host)[:num_rows] = 0
        self._send(host, num_rows)

    # ---- one step --------------------------------------------------------------------------------

    def prepare(
        self,
        batch: ScheduledBatch,
        pending_rows: dict[Sequence, int],
        pending_ids: torch.Tensor | None,
        pad_decodes_to: int | None = None,
    ) -> StepInputs:
        """Fill and send the inputs of ``batch``.

        A decode whose input token is still pending (sampled by the previous step, not yet on the
        host) takes it from ``pending_ids[pending_rows[seq]]`` on the device. ``pad_decodes_to``
        pads a decode-only batch to a captured graph's size: padded rows store nothing and read no
        cache (context length 0).
        """
        num_seqs = len(batch.seqs)
        if num_seqs > self.max_num_seqs or batch.num_tokens > self.max_num_tokens:
            raise ValueError(
                f"batch of {num_seqs} sequences / {batch.num_tokens} tokens exceeds the runner's "
                f"buffers ({self.max_num_seqs} / {self.max_num_tokens})"
            )
        host = self._next_host()
        ids, positions, slots = (self._section(host, n) for n in ("input_ids", "positions", "slots"))
        context_lens = self._section(host, "context_lens")
        tables = self._block_tables(host)
        bs = self.block_size

        order = sorted(range(num_seqs), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first
        num_decodes = sum(1 for n in batch.num_new_tokens if n == 1)
        last_row = [0] * num_seqs
        gather_dst: list[int] = []
        gather_src: list[int] = []
        # Decodes: plain lists, written once.
        decode_ids, decode_pos, decode_slots, decode_ctx = [], [], [], []
        for row, i in enumerate(order[:num_decodes]):
            seq, start = batch.seqs[i], batch.start_positions[i]
            table = seq.block_table
            if start < len(seq.token_ids):
                decode_ids.append(seq.token_ids[start])
            else:  # the previous step's sample, still on the device
                decode_ids.append(0)
                gather_dst.append(row)
                gather_src.append(pending_rows[seq])
            decode_pos.append(start)
            decode_slots.append(table[start // bs] * bs + start % bs)
            decode_ctx.append(start + 1)
            tables[row, : len(table)] = table
            last_row[i] = row
        ids[:num_decodes] = decode_ids
        positions[:num_decodes] = decode_pos
        slots[:num_decodes] = decode_slots
        context_lens[:num_decodes] = decode_ctx
        # Prefill chunks: numpy per sequence.
        cu_seqlens = self._section(host, "cu_seqlens")
        cu_seqlens[0] = 0
        row = num_decodes
        max_query_len = 0
        for k, i in enumerate(order[num_decodes:]):
            seq, start, num_new = batch.seqs[i], batch.start_positions[i], batch.num_new_tokens[i]
            table = np.asarray(seq.block_table, dtype=np.int64)
            chunk = seq.token_ids[start : start + num_new]
            if len(chunk) != num_new:
                raise RuntimeError(f"{seq!r}: a prefill chunk reaches tokens that are still pending")
            pos = np.arange(start, start + num_new)
            ids[row : row + num_new] = chunk
            positions[row : row + num_new] = pos
            slots[row : row + num_new] = table[pos // bs] * bs + pos % bs
            context_lens[num_decodes + k] = start + num_new
            tables[num_decodes + k, : len(table)] = table
            row += num_new
            cu_seqlens[k + 1] = row - num_decodes
            last_row[i] = row - 1
            max_query_len = max(max_query_len, num_new)
        num_tokens = row
        num_prefills = num_seqs - num_decodes

        num_padded = num_tokens
        if pad_decodes_to is not None and num_prefills == 0:
            num_padded = pad_decodes_to
            ids[num_tokens:num_padded] = 0
            positions[num_tokens:num_padded] = 0
            slots[num_tokens:num_padded] = -1
            context_lens[num_tokens:num_padded] = 0

        samples = [last_row[i] for _, i in batch.sample_rows]
        sample_rows = None
        if samples != list(range(len(samples))):
            self._section(host, "sample_rows")[: len(samples)] = samples
            sample_rows = self.device_view("sample_rows", len(samples))
        if gather_dst:
            gather = self._section(host, "gather")
            gather[: len(gather_dst)] = gather_dst
            gather[self.max_num_seqs : self.max_num_seqs + len(gather_src)] = gather_src
        self._send(host, max(num_seqs, num_padded if num_prefills == 0 else 0))

        input_ids = self.device_view("input_ids", num_padded)
        if gather_dst:
            if pending_ids is None:
                raise RuntimeError("a decode input is pending but the previous step's samples are gone")
            dst = self.device_view("gather", len(gather_dst))
            src = self.device_view("gather", len(gather_src), self.max_num_seqs)
            input_ids[dst] = pending_ids[src].to(torch.int32)

        max_context = max(decode_ctx + list(context_lens[num_decodes:num_seqs]), default=0)
        if num_prefills == 0:
            metadata = self.decode_metadata(num_padded)
            metadata.max_context_len = int(max_context)
        else:
            metadata = AttentionMetadata(
                slot_mapping=self.device_view("slots", num_tokens),
                num_decode_tokens=num_decodes,
                decode_block_tables=self.device_block_tables(0, num_decodes),
                decode_context_lens=self.device_view("context_lens", num_decodes),
                prefill_cu_seqlens_q=self.device_view("cu_seqlens", num_prefills + 1),
                prefill_context_lens=self.device_view("context_lens", num_prefills, num_decodes),
                prefill_block_tables=self.device_block_tables(num_decodes, num_prefills),
                max_prefill_query_len=max_query_len,
                max_context_len=int(max_context),
            )
        return StepInputs(
            input_ids=input_ids,
            positions=self.device_view("positions", num_padded),
            metadata=metadata,
            sample_rows=sample_rows,
            num_samples=len(samples),
            num_tokens=num_tokens,
            num_padded=num_padded,
            is_decode_only=num_prefills == 0,
            last_rows=last_row,
        )

    # ---- internals -------------------------------------------------------------------------------

    def _next_host(self) -> np.ndarray:
        """The host buffer to fill now, once its previous copy to the device has been issued and done."""
        self._turn = (self._turn + 1) % len(self.hosts)
        event = self.copied[self._turn]
        if event is not None:
            event.synchronize()
        return self.hosts[self._turn].numpy()

    def _section(self, host: np.ndarray, name: str) -> np.ndarray:
        begin = self.offsets[name]
        return host[begin : begin + self.sizes[name]]

    def _block_tables(self, host: np.ndarray) -> np.ndarray:
        return host[self.block_tables_offset :].reshape(self.max_num_seqs, self.width)

    def _send(self, host: np.ndarray, num_table_rows: int) -> None:
        if self.device_buffer is None:
            return  # CPU: the host buffer is the input
        length = self.block_tables_offset + num_table_rows * self.width
        source = self.hosts[self._turn]
        self.device_buffer[:length].copy_(source[:length], non_blocking=True)
        event = self.copied[self._turn]
        if event is not None:
            event.record()
