"""Freeing KV blocks behind a sliding window, with a fake runner: reference counts stay right under
forks (``n > 1``), preemption, prefix caching and chunked prefill, and no sequence ever holds a block
wholly before the window of its next token."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pagedserve.engine.block_manager import NO_BLOCK, BlockManager
from pagedserve.engine.config import SchedulerConfig
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence
from pagedserve_plugins.scheduling_policies import FcfsPolicy

from .engine_helpers import FakeRunner, assert_pool_free


def _scheduler(num_blocks: int, block_size: int, window: int | None, **config: int) -> Scheduler:
    pool = BlockManager(num_blocks, block_size, True, sliding_window=window)
    return Scheduler(SchedulerConfig(**config), pool, FcfsPolicy(), max_model_len=512)


def _run_checking_windows(scheduler: Scheduler, window: int) -> int:
    """Run to completion; after each schedule, check the blocks each running sequence holds. Returns
    how many blocks the pool had in use at most."""
    runner, pool, most = FakeRunner(), scheduler.block_manager, 0
    for _ in range(10_000):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        for seq, start in zip(batch.seqs, batch.start_positions, strict=True):
            first_needed = start - window + 1
            for index, block_id in enumerate(seq.block_table):
                wholly_before = (index + 1) * pool.block_size <= first_needed
                assert (block_id == NO_BLOCK) == wholly_before, (seq, index, start)
        most = max(most, pool.usage().num_used)
        scheduler.postprocess(batch, runner.run(batch))
    assert not scheduler.has_unfinished()
    assert_pool_free(pool)
    return most


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    window=st.integers(1, 20),
    prompts=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    n=st.integers(1, 3),
    budget=st.integers(4, 64),
    spare_blocks=st.integers(0, 10),
)
def test_windowed_blocks_under_forks_chunks_and_preemption(
    block_size, window, prompts, n, budget, spare_blocks
):
    # room for one request's worst case (what the engine's admission check asks), so others preempt
    num_blocks = -(-(60 + 25) // block_size) + spare_blocks
    scheduler = _scheduler(num_blocks, block_size, window, max_num_batched_tokens=budget, max_num_seqs=16)
    shared = [7, 8, 9, 10, 11, 12] * 5  # a common prefix, so the prefix cache takes part
    for i, length in enumerate(prompts):
        params = SamplingParams(max_tokens=25, ignore_eos=True, n=n, temperature=1.0)
        scheduler.add(Sequence(f"r{i}", shared[: length // 2] + [20 + i] * (length - length // 2), params))
    _run_checking_windows(scheduler, window)


def test_a_window_holds_a_bounded_number_of_blocks():
    """One long request: with a window of 8 it holds a few blocks; without one, all of them."""
    usage = {}
    for window in (8, None):
        scheduler = _scheduler(64, 4, window, max_num_batched_tokens=8)
        scheduler.add(Sequence("r", list(range(10, 110)), SamplingParams(max_tokens=60, ignore_eos=True)))
        usage[window] = _run_checking_windows(scheduler, window or 10**9)
    assert usage[8] <= 6
    assert usage[None] == 40  # 160 tokens, the last one never stored


@pytest.mark.parametrize("window", [0, -1])
def test_a_window_below_one_is_refused(window):
    with pytest.raises(ValueError, match="sliding_window"):
        BlockManager(8, 4, sliding_window=window)
