"""The pool of KV-cache blocks: free list, reference counts, block tables and the prefix cache.

A block holds the K/V of ``block_size`` consecutive tokens. Full blocks whose KV has been computed
are registered under a hash chained with the previous block's hash, so a later sequence with the same
prefix reuses them. A block whose last user leaves goes back on the free list but keeps its hash;
it is only forgotten when the free list hands it out again (lazy eviction). Blocks with a hash go to
the tail of the free list and blocks without one to the head, so cached blocks age out in LRU order.

With a sliding window on every attention layer (``sliding_window``), a sequence's blocks that lie wholly
before the window of its next token are freed before each allocation, as vLLM does; their block-table
entries become :data:`NO_BLOCK`, so positions keep their indices. They are freed like any other block
(hashed ones stay in the prefix cache until handed out again), so a later prompt with the same prefix
still finds the whole chain or stops at its first missing block: never a wrong hit. A model with any
global layer (Gemma's local/global mix) needs every block, and none is freed.

This module knows nothing about tensors: copy-on-write returns ``(src, dst)`` pairs for the runner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagedserve.engine.sequence import Sequence

_ROOT_HASH = 0x5A17ED  # parent hash of every sequence's first block
NO_BLOCK = -1
"""A block-table entry whose block fell out of the sliding window and was freed (never read)."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions on lookup


@dataclass(frozen=True)
class BlockUsage:
    """A snapshot for statistics and metrics."""

    num_blocks: int
    num_used: int
    num_free: int
    num_cached: int
    num_queried_tokens: int
    num_hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks


class BlockManager:
    """Owns every block; a sequence only holds block ids in ``seq.block_table``."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 or unset, got {sliding_window}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_all_free(self) -> bool:
        return len(self.free_ids) == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)

    def usage(self) -> BlockUsage:
        num_free = len(self.free_ids)
        return BlockUsage(
            self.num_blocks,
            self.num_blocks - num_free,
            num_free,
            len(self.hash_to_block),
            self._num_queried_tokens,
            self._num_hit_tokens,
        )

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(seq)
        max_blocks = (len(seq) - 1) // self.block_size
        hits = []
        for i, block_hash in enumerate(seq.block_hashes[:max_blocks]):
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break
            hits.append(block_id)
        return hits

    # ---- allocation ------------------------------------------------------------------------------

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached_blocks: list[int] | None = None,
        num_reserve_tokens: int = 0,
    ) -> list[tuple[int, int]] | None:
        """Make room for ``num_new_tokens`` more tokens of ``seq``; ``None`` if the pool is too small.

        ``cached_blocks`` (from :meth:`find_cached_prefix`, only for a sequence holding no blocks) are
        taken first and count as computed. ``num_reserve_tokens`` asks that the pool could also hold
        that many tokens past the computed ones (admission of a whole prompt), without taking them.
        Returns the ``(src, dst)`` block copies needed for copy-on-write.
        """
        self.free_out_of_window(seq)
        cached_blocks = cached_blocks or []
        computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        table_len = len(seq.block_table) + len(cached_blocks)
        num_new_blocks = max(0, self.blocks_needed(computed + num_new_tokens) - table_len)
        num_reserved = max(num_new_blocks, self.blocks_needed(computed + num_reserve_tokens) - table_len)
        num_revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        needs_copy = self._is_shared(seq, computed)
        if num_reserved + num_revived + needs_copy > len(self.free_ids):
            return None
        if cached_blocks or seq.num_computed_tokens == 0:
            self._take_cached(seq, cached_blocks, len(seq))
            self.free_out_of_window(seq)  # a long cached prefix may reach far behind the window
        copies = [self._copy_on_write(seq, computed)] if needs_copy else []
        for _ in range(num_new_blocks):
            seq.block_table.append(self._pop_free().block_id)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent``; a later write into a shared block copies it."""
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks
        for block_id in child.block_table:
            if block_id != NO_BLOCK:
                self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release the blocks of ``seq``, tail first so a prefix chain is evicted from its end."""
        for block_id in reversed(seq.block_table):
            if block_id != NO_BLOCK:
                self._release(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def free_out_of_window(self, seq: Sequence) -> int:
        """Free the blocks of ``seq`` that no query from its next position on can see; returns how many.

        The next query sits at ``seq.num_computed_tokens`` and sees keys from ``num_computed_tokens -
        window + 1`` on. A step still running on the device may read a freed block, but whatever
        reuses it writes only in later steps, which the device runs after that one."""
        if self.sliding_window is None:
            return 0
        # Offer them to the prefix cache first: with overlapped steps the previous step's results, and
        # so its cache_full_blocks, come only after this.
        self.cache_full_blocks(seq)
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        num_freed = 0
        # Freed blocks form a prefix of the table: walk back from the last one out of the window.
        for index in range(min(first_needed // self.block_size, len(seq.block_table)) - 1, -1, -1):
            block_id = seq.block_table[index]
            if block_id == NO_BLOCK:
                break
            self._release(block_id)
            seq.block_table[index] = NO_BLOCK
            num_freed += 1
        return num_freed

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the full, computed blocks of ``seq`` in the prefix cache (after a model step)."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(seq)
        # Pending tokens (sampled, not yet appended) count as computed but cannot be hashed yet.
        num_computed = min(seq.num_computed_tokens, len(seq))
        num_full = min(num_computed // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:
            return
        for i in range(seq.num_hashed_blocks, num_full):
            if seq.block_table[i] == NO_BLOCK:
                continue  # freed by the window before this step's results came back: not cached
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.hash is not None or block_hash in self.hash_to_block:
                continue
            block.hash = block_hash
            block.token_ids = self._block_tokens(seq, i)
            self.hash_to_block[block_hash] = block.block_id
        seq.num_hashed_blocks = num_full

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()

    # ---- internals -------------------------------------------------------------------------------

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def _extend_hashes(self, seq: Sequence) -> None:
        for i in range(len(seq.block_hashes), len(seq) // self.block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT_HASH
            seq.block_hashes.append(hash((parent, self._block_tokens(seq, i))))

    def _take_cached(self, seq: Sequence, cached_blocks: list[int], num_query_tokens: int) -> None:
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = len(cached_blocks) * self.block_size
        seq.num_hashed_blocks = len(cached_blocks)
        seq.num_computed_tokens += seq.num_cached_tokens
        self._num_queried_tokens += num_query_tokens
        self._num_hit_tokens += seq.num_cached_tokens

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None
            if block.hash is None:  # nothing to reuse in it: hand it out first
                self.free_ids.move_to_end(block_id, last=False)

    def _is_shared(self, seq: Sequence, write_pos: int) -> bool:
        index = write_pos // self.block_size
        return index < len(seq.block_table) and self.blocks[seq.block_table[index]].ref_count > 1

    def _copy_on_write(self, seq: Sequence, write_pos: int) -> tuple[int, int]:
        index = write_pos // self.block_size
        src = seq.block_table[index]
        self.blocks[src].ref_count -= 1  # still >= 1: another sequence keeps it
        dst = self._pop_free().block_id
        seq.block_table[index] = dst
        return (src, dst)

    def _pop_free(self) -> Block:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # lazy eviction: forget the cached content only now
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block
