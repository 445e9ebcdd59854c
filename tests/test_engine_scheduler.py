"""Scheduler mechanics with a fake runner: budgets, chunked prefill, preemption, policies, n > 1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.config import SchedulerConfig
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence
from pagedserve_plugins.scheduling_policies import FcfsPolicy, PriorityPolicy, ShortestPromptPolicy

from .engine_helpers import FakeRunner, assert_pool_free, run_to_completion


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    policy=None,
    max_model_len: int = 512,
    prefix_caching: bool = True,
    **config,
) -> Scheduler:
    pool = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(
        SchedulerConfig(**config),
        pool,
        policy or FcfsPolicy(),
        max_model_len=max_model_len,
        eos_token_ids=frozenset({0}),
    )


def add(
    scheduler: Scheduler,
    rid: str,
    num_prompt: int,
    max_tokens: int = 8,
    priority: int = 0,
    first_token: int = 10,
    **params,
) -> Sequence:
    prompt = [first_token + (i * 7) % 50 for i in range(num_prompt)]
    seq = Sequence(
        rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), priority=priority
    )
    scheduler.check_request(len(prompt), seq.params)
    scheduler.add(seq)
    return seq


def test_budgets_are_respected_every_step():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [add(scheduler, f"r{i}", 7) for i in range(5)]
    runner = FakeRunner()
    run_to_completion(scheduler, runner)
    for batch in runner.batches:
        assert batch.num_tokens <= 10
        assert len(batch.seqs) <= 3
    assert all(s.finish_reason == "length" and s.num_output_tokens == 8 for s in seqs)
    assert_pool_free(scheduler.block_manager)


def test_chunked_prefill_keeps_decodes_flowing():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    short = add(scheduler, "short", 3, max_tokens=20)
    runner = FakeRunner()
    scheduler.postprocess(batch := scheduler.schedule(), runner.run(batch))
    add(scheduler, "long", 40, max_tokens=2)
    chunks = []
    while not short.is_finished:
        batch = scheduler.schedule()
        assert short in batch.seqs, "a running decode was starved by a prefill"
        chunks += [n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True) if s.request_id == "long"]
        scheduler.postprocess(batch, runner.run(batch))
    assert sum(chunks[:6]) >= 40 - 7 and max(chunks) <= 7
    run_to_completion(scheduler, runner)
    assert_pool_free(scheduler.block_manager)


def test_without_chunked_prefill_a_prompt_is_scheduled_whole():
    scheduler = make_scheduler(max_num_batched_tokens=16, chunked_prefill=False)
    add(scheduler, "a", 10)
    add(scheduler, "b", 10)
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [10]


def _outputs(num_blocks: int, prompts: list[int], max_tokens: int, policy=None, **config) -> tuple:
    scheduler = make_scheduler(num_blocks=num_blocks, policy=policy, **config)
    seqs = [
        add(scheduler, f"r{i}", n, max_tokens=max_tokens, first_token=10 + i) for i, n in enumerate(prompts)
    ]
    run_to_completion(scheduler, FakeRunner())
    assert_pool_free(scheduler.block_manager)
    return [s.output_token_ids for s in seqs], scheduler.num_preemptions


@pytest.mark.parametrize("policy", [FcfsPolicy(), PriorityPolicy(), ShortestPromptPolicy()])
def test_preemption_by_recompute_leaves_outputs_unchanged(policy):
    prompts = [9, 14, 5, 11, 7]
    expected, none = _outputs(200, prompts, 12, policy)
    got, preemptions = _outputs(8, prompts, 12, policy)
    assert none == 0 and preemptions > 0
    assert got == expected


@settings(max_examples=25, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    max_tokens=st.integers(1, 12),
    num_blocks=st.integers(11, 40),
    budget=st.integers(1, 40),
    max_num_seqs=st.integers(1, 4),
)
def test_any_pool_and_budget_finish_with_the_same_outputs(
    prompts, max_tokens, num_blocks, budget, max_num_seqs
):
    expected, _ = _outputs(400, prompts, max_tokens)
    got, _ = _outputs(
        num_blocks, prompts, max_tokens, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs
    )
    assert got == expected


def test_finished_sequences_free_their_blocks_at_once():
    scheduler = make_scheduler(prefix_caching=False)
    quick = add(scheduler, "quick", 6, max_tokens=1)
    slow = add(scheduler, "slow", 6, max_tokens=5)
    runner = FakeRunner()
    batch = scheduler.schedule()
    scheduler.postprocess(batch, runner.run(batch))
    assert quick.is_finished and quick.block_table == []
    assert scheduler.block_manager.num_free_blocks == 64 - len(slow.block_table)


def test_abort_frees_running_and_waiting_requests():
    scheduler = make_scheduler(max_num_seqs=1)
    running = add(scheduler, "run", 10)
    waiting = add(scheduler, "wait", 10)
    batch = scheduler.schedule()
    scheduler.postprocess(batch, FakeRunner().run(batch))
    assert running.block_table and not waiting.block_table
    scheduler.abort("run")
    scheduler.abort("wait")
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert not scheduler.has_unfinished()
    assert_pool_free(scheduler.block_manager)


def test_requests_that_can_never_fit_are_rejected():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="model context of 64"):
        scheduler.check_request(64, SamplingParams())
    with pytest.raises(ValueError, match="whole cache holds 16"):
        scheduler.check_request(10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        scheduler.check_request(0, SamplingParams())
    scheduler.check_request(10, SamplingParams(max_tokens=6))


def _admission_order(policy, specs: list[tuple[str, int, int]]) -> list[str]:
    scheduler = make_scheduler(policy=policy, max_num_seqs=1)
    for rid, num_prompt, priority in specs:
        add(scheduler, rid, num_prompt, max_tokens=1, priority=priority)
    order = []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        order += [s.request_id for s in batch.seqs if s.request_id not in order]
        scheduler.postprocess(batch, FakeRunner().run(batch))
    return order


def test_policies_order_waiting_requests():
    specs = [("a", 9, 2), ("b", 3, 1), ("c", 6, 1), ("d", 1, 3)]
    assert _admission_order(FcfsPolicy(), specs) == ["a", "b", "c", "d"]
    assert _admission_order(PriorityPolicy(), specs) == ["b", "c", "a", "d"]
    assert _admission_order(ShortestPromptPolicy(), specs) == ["d", "b", "c", "a"]


def test_priority_policy_preempts_the_lowest_priority():
    scheduler = make_scheduler(policy=PriorityPolicy())
    seqs = [add(scheduler, f"p{p}", 4, priority=p) for p in (0, 5, 2)]
    assert PriorityPolicy().select_victim(seqs).request_id == "p5"


def test_n_greater_than_one_forks_and_copies_on_write():
    scheduler = make_scheduler(block_size=4)
    parent = add(scheduler, "r", 6, max_tokens=4, n=3)
    runner = FakeRunner()
    batch = scheduler.schedule()
    assert len(batch.seqs) == 1 and len(batch.sample_rows) == 3
    scheduler.postprocess(batch, runner.run(batch))
    family = [s for s in scheduler.running if s.request_id == "r"]
    assert sorted(s.index for s in family) == [0, 1, 2]
    assert len({tuple(s.block_table) for s in family}) == 1  # all share the prompt's blocks
    batch = scheduler.schedule()
    assert (
        len(batch.block_copies) == 2
    )  # two of three copy the shared partial block; the last writes in place
    scheduler.postprocess(batch, runner.run(batch))
    run_to_completion(scheduler, runner)
    assert [s.num_output_tokens for s in family] == [4, 4, 4]
    assert parent.output_token_ids != family[1].output_token_ids
    assert_pool_free(scheduler.block_manager)


@pytest.mark.parametrize("budget", [64, 5])  # whole prompts in one step, or chunked over several
def test_a_burst_of_n_greater_than_one_never_exceeds_max_num_seqs(budget):
    """A parent that has not forked yet holds all ``n`` seats: admitted as one, it would fork past
    ``max_num_seqs`` and overflow the runner's buffers."""
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=budget)
    seqs = [add(scheduler, f"r{i}", 6, max_tokens=3, n=2) for i in range(5)]
    runner = FakeRunner()
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        assert len(scheduler.running) <= 4 and len(batch.sample_rows) <= 4
        scheduler.postprocess(batch, runner.run(batch))
    assert all(s.num_output_tokens == 3 for s in seqs)
    assert_pool_free(scheduler.block_manager)


def test_after_a_failed_step_running_requests_wait_again_and_one_can_run_alone():
    def start() -> tuple[Scheduler, list[Sequence]]:
        scheduler = make_scheduler(max_num_seqs=4)
        return scheduler, [
            add(scheduler, rid, 6, max_tokens=4, first_token=t) for rid, t in (("a", 10), ("b", 20))
        ]

    clean, expected = start()
    runner = FakeRunner()
    run_to_completion(clean, runner)
    scheduler, seqs = start()
    scheduler.postprocess(batch := scheduler.schedule(), runner.run(batch))
    scheduler.schedule()  # a step whose samples are lost: it failed
    assert scheduler.requeue_running() == ["a", "b"]
    assert not scheduler.running
    assert all(s.num_pending_tokens == 0 and s.num_computed_tokens == 0 and not s.block_table for s in seqs)
    scheduler.only = "b"
    batch = scheduler.schedule()
    assert batch.seqs == [seqs[1]]
    scheduler.postprocess(batch, runner.run(batch))
    scheduler.only = None
    run_to_completion(scheduler, runner)
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in expected]
    assert_pool_free(scheduler.block_manager)
