"""Block pool: reference counts, prefix hits, lazy LRU eviction, copy-on-write, usage."""

from __future__ import annotations

import pytest
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

from .engine_helpers import assert_pool_free


def seq_of(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def compute(pool: BlockManager, seq: Sequence, cached: list[int] | None = None) -> None:
    """Allocate and 'compute' all uncomputed tokens, as one scheduler step would."""
    num_new = len(seq) - seq.num_computed_tokens - len(cached or []) * pool.block_size
    assert pool.allocate_slots(seq, num_new, cached) == []
    seq.num_computed_tokens += num_new
    pool.cache_full_blocks(seq)


def test_allocate_and_free_return_every_block():
    pool = BlockManager(8, 4)
    seq = seq_of(list(range(10)))
    compute(pool, seq)
    assert len(seq.block_table) == 3 and pool.num_free_blocks == 5
    assert all(pool.blocks[b].ref_count == 1 for b in seq.block_table)
    pool.free(seq)
    assert seq.block_table == []
    assert_pool_free(pool)


def test_allocation_fails_without_side_effects_when_pool_is_short():
    pool = BlockManager(2, 4)
    seq = seq_of(list(range(12)))
    assert pool.allocate_slots(seq, 12) is None
    assert seq.block_table == [] and pool.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_leaves_the_last_token_to_compute():
    pool = BlockManager(16, 4)
    first = seq_of(list(range(9)), "a")
    compute(pool, first)  # blocks [0..3] [4..7] are full and cached, [8] is partial
    second = seq_of(list(range(8)) + [99, 100], "b")
    hits = pool.find_cached_prefix(second)
    assert hits == first.block_table[:2]
    compute(pool, second, hits)
    assert second.num_cached_tokens == 8
    assert [pool.blocks[b].ref_count for b in hits] == [2, 2]
    # A prompt equal to the cached prefix still recomputes its last block (logits are needed).
    same = seq_of(list(range(8)), "c")
    assert pool.find_cached_prefix(same) == first.block_table[:1]
    for s in (first, second):
        pool.free(s)
    assert_pool_free(pool)
    assert pool.usage().hit_rate == pytest.approx(8 / (9 + 10))


def test_hash_chain_depends_on_earlier_blocks():
    pool = BlockManager(16, 4)
    compute(pool, seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    other = seq_of([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")  # same second block, different first
    assert pool.find_cached_prefix(other) == []


def test_freed_cached_blocks_are_reused_lazily_in_lru_order():
    pool = BlockManager(4, 2)
    old = seq_of([1, 2, 3, 4], "old")
    compute(pool, old)
    pool.free(old)  # two cached blocks, free but still findable
    assert pool.usage().num_cached == 2
    newer = seq_of([5, 6, 7, 8], "new")
    compute(pool, newer)  # takes the two never-used blocks first
    probe = seq_of([1, 2, 3, 4, 0], "probe")
    assert len(pool.find_cached_prefix(probe)) == 2
    pool.free(newer)
    # The least recently freed blocks go first, and of a chain its tail was freed first.
    one = seq_of([9, 9], "one")
    compute(pool, one)
    assert len(pool.find_cached_prefix(probe)) == 1
    pool.free(one)
    assert_pool_free(pool)


def test_reviving_a_cached_free_block_takes_it_off_the_free_list():
    pool = BlockManager(4, 2)
    a = seq_of([1, 2, 3, 4, 5], "a")
    compute(pool, a)
    pool.free(a)
    b = seq_of([1, 2, 3, 4, 6], "b")
    hits = pool.find_cached_prefix(b)
    assert len(hits) == 2
    compute(pool, b, hits)
    assert pool.num_free_blocks == 1
    pool.free(b)
    assert_pool_free(pool)


def test_copy_on_write_for_forked_partial_block():
    pool = BlockManager(8, 4)
    parent = seq_of([1, 2, 3, 4, 5, 6], "r")
    compute(pool, parent)
    child = parent.fork(1)
    pool.fork(parent, child)
    assert [pool.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    for seq in (parent, child):
        seq.append_token(7, 0.0, None)
    copies = pool.allocate_slots(child, 1)  # writes position 6 into the shared, partial block
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    assert pool.allocate_slots(parent, 1) == []  # now the only owner: writes in place
    assert pool.blocks[parent.block_table[1]].ref_count == 1
    for seq in (parent, child):
        pool.free(seq)
    assert_pool_free(pool)


def test_usage_snapshot():
    pool = BlockManager(10, 4)
    seq = seq_of(list(range(6)))
    compute(pool, seq)
    usage = pool.usage()
    assert (usage.num_blocks, usage.num_used, usage.num_free, usage.num_cached) == (10, 2, 8, 1)
    assert usage.usage == pytest.approx(0.2)
    pool.free(seq)


def test_prefix_caching_off_never_hits():
    pool = BlockManager(8, 2, enable_prefix_caching=False)
    a = seq_of([1, 2, 3, 4, 5], "a")
    compute(pool, a)
    assert pool.find_cached_prefix(seq_of([1, 2, 3, 4, 5], "b")) == []
    assert pool.usage().num_cached == 0
    pool.free(a)
    assert_pool_free(pool)
