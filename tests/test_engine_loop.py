"""The engine drivers: thread-safe submit/abort, callbacks, freeing blocks on abort.

Every behaviour test runs against both drivers, the engine on a thread of this process
(:class:`EngineLoop`) and in a child process (:class:`EngineProcess`); the process-only tests cover
what a second process adds: start-up errors and a child that dies (and is restarted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
from pagedserve.engine.engine_loop import EngineLoop
from pagedserve.engine.engine_process import EngineProcess, EngineStartError
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import assert_pool_free, engine_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("t") / "tiny")


def _start(kind: str, tiny, **overrides):
    config = engine_config(tiny, block_size=8, **overrides)
    loop = EngineLoop(LLMEngine(config)) if kind == "thread" else EngineProcess(config)
    loop.start()
    return loop


def _assert_idle_and_free(loop) -> None:
    stats = loop.stats()
    assert (stats.num_running, stats.num_waiting, stats.usage.num_used) == (0, 0, 0)
    if isinstance(loop, EngineLoop):
        assert_pool_free(loop.engine.block_manager)


@pytest.fixture(params=["thread", "process"])
def loop(request, tiny):
    loop = _start(request.param, tiny)
    yield loop
    loop.stop(timeout=10)
    _assert_idle_and_free(loop)


class Collector:
    def __init__(self) -> None:
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, output) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()


def _wait_idle(loop, seconds: float = 5.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        stats = loop.stats()
        if stats.num_running == stats.num_waiting == 0:
            return
        time.sleep(0.01)


def test_requests_from_many_threads_all_finish(loop):
    collectors = {f"r{i}": Collector() for i in range(6)}

    def client(rid: str) -> None:
        request = loop.make_request(
            rid, f"prompt number {rid}", SamplingParams(max_tokens=8, ignore_eos=True)
        )
        loop.submit(request, collectors[rid])

    threads = [threading.Thread(target=client, args=(rid,)) for rid in collectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid, collector in collectors.items():
        assert collector.done.wait(30), rid
        final = collector.outputs[-1]
        assert final.request_id == rid and len(final.outputs[0].token_ids) == 8
        assert "".join(o.outputs[0].text_delta for o in collector.outputs) == final.outputs[0].text
        assert sum(o.outputs[0].num_new_tokens for o in collector.outputs) == 8
        assert final.prompt_token_ids == loop.tokenizer.encode(f"prompt number {rid}")


def test_abort_stops_a_request_and_frees_it(loop):
    collector = Collector()
    loop.submit(
        loop.make_request("long", "go on", SamplingParams(max_tokens=2000, ignore_eos=True)), collector
    )
    while not collector.outputs:
        time.sleep(0.01)
    loop.abort("long")
    assert collector.done.wait(10)
    assert collector.outputs[-1].outputs[0].finish_reason == "abort"
    _wait_idle(loop)
    _assert_idle_and_free(loop)


def test_duplicate_id_is_reported_through_the_callback(loop):
    first, second = Collector(), Collector()
    loop.submit(loop.make_request("same", "a", SamplingParams(max_tokens=50, ignore_eos=True)), first)
    loop.submit(loop.make_request("same", "b", SamplingParams(max_tokens=3)), second)
    assert second.done.wait(10) and "already in use" in second.outputs[-1].error
    assert first.done.wait(30) and first.outputs[-1].error is None
    assert len(first.outputs[-1].outputs[0].token_ids) == 50


def test_a_request_the_engine_cannot_serve_is_refused(loop):
    ids = list(range(3, 3 + 4096))  # longer than tiny-llama's context
    with pytest.raises(ValueError, match="leaves no room"):  # both drivers check at once
        loop.make_request("huge", ids, SamplingParams(max_tokens=4))
    collector = Collector()  # one that skipped make_request fails through its callback
    loop.submit(EngineRequest("huge", ids, SamplingParams(max_tokens=4)), collector)
    assert collector.done.wait(10)
    assert "leaves no room" in collector.outputs[-1].error
    ok = Collector()  # the engine goes on serving
    loop.submit(loop.make_request("ok", "hello", SamplingParams(max_tokens=3, ignore_eos=True)), ok)
    assert ok.done.wait(30) and len(ok.outputs[-1].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_stop_aborts_running_requests(kind, tiny):
    loop = _start(kind, tiny)
    collector = Collector()
    loop.submit(loop.make_request("x", "hi", SamplingParams(max_tokens=1000, ignore_eos=True)), collector)
    loop.stop(timeout=10)
    assert collector.done.is_set() and collector.outputs[-1].outputs[0].finish_reason == "abort"
    _assert_idle_and_free(loop)
    late = Collector()
    with pytest.raises(RuntimeError) if kind == "thread" else contextlib.nullcontext():
        loop.submit(loop.make_request("y", "hi", SamplingParams(max_tokens=2)), late)
    if kind == "process":
        assert late.done.is_set() and "stopped" in late.outputs[-1].error


def test_both_drivers_generate_the_same_tokens(tiny):
    prompts = {f"p{i}": f"the prompt {i} " * (i + 1) for i in range(5)}
    tokens = {}
    for kind in ("thread", "process"):
        loop = _start(kind, tiny)
        collectors = {rid: Collector() for rid in prompts}
        # One at a time: batches of the same shapes in both drivers, so the float results are equal.
        for rid, text in prompts.items():
            params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
            loop.submit(loop.make_request(rid, text, params), collectors[rid])
            assert collectors[rid].done.wait(30)
        tokens[kind] = {
            rid: (c.outputs[-1].outputs[0].token_ids, len(c.outputs[-1].outputs[0].logprobs))
            for rid, c in collectors.items()
        }
        loop.stop(timeout=10)
    assert tokens["thread"] == tokens["process"]
    assert all(n == 12 for _, n in tokens["process"].values())


def test_engine_start_error_names_the_problem(tiny):
    with pytest.raises(EngineStartError, match="nonexistent"):
        EngineProcess(engine_config(tiny, kernel="nonexistent"))


def test_a_dead_engine_process_fails_its_requests_and_is_restarted(tiny):
    loop = _start("process", tiny)
    collector = Collector()
    loop.submit(loop.make_request("x", "hi", SamplingParams(max_tokens=1000, ignore_eos=True)), collector)
    while not collector.outputs:
        time.sleep(0.01)
    first_pid = loop.pid
    os.kill(first_pid, signal.SIGKILL)
    assert collector.done.wait(10)
    assert "exited unexpectedly" in collector.outputs[-1].error
    assert collector.outputs[-1].error_code == "UNAVAILABLE"
    later = Collector()  # waits for the new child
    loop.submit(loop.make_request("y", "hi", SamplingParams(max_tokens=2, ignore_eos=True)), later)
    assert later.done.wait(120) and later.outputs[-1].error is None
    assert len(later.outputs[-1].outputs[0].token_ids) == 2
    assert loop.pid != first_pid and loop.restarts == 1
    loop.stop(timeout=10)


def test_an_engine_process_that_cannot_restart_reports_its_failure(tiny, monkeypatch):
    loop = _start("process", tiny)
    assert loop.failure() is None
    collector = Collector()
    loop.submit(loop.make_request("x", "hi", SamplingParams(max_tokens=1000, ignore_eos=True)), collector)
    while not collector.outputs:
        time.sleep(0.01)

    def cannot_start() -> None:
        raise OSError(24, "Too many open files")  # not an EngineStartError: must not hang the receiver

    monkeypatch.setattr(loop, "_spawn", cannot_start)
    os.kill(loop.pid, signal.SIGKILL)
    assert collector.done.wait(10) and collector.outputs[-1].error_code == "UNAVAILABLE"
    later = Collector()
    loop.submit(loop.make_request("y", "hi", SamplingParams(max_tokens=2)), later)
    assert later.done.wait(30), "a request after a failed restart must be answered, not queued forever"
    assert later.outputs[-1].error_code == "UNAVAILABLE" and "could not restart" in later.outputs[-1].error
    assert "Too many open files" in (loop.failure() or "")  # the model index shows this reason
    loop.stop(timeout=10)


def test_an_engine_process_that_keeps_dying_stays_down(tiny, monkeypatch):
    from pagedserve.engine import engine_process

    monkeypatch.setattr(engine_process, "_MAX_RESTARTS_IN_WINDOW", 1)
    loop = _start("process", tiny)
    for attempt in range(2):
        collector = Collector()  # waits for a restarted child on the second round
        loop.submit(
            loop.make_request(f"r{attempt}", "hi", SamplingParams(max_tokens=1000, ignore_eos=True)),
            collector,
        )
        while not collector.outputs:
            time.sleep(0.01)
        os.kill(loop.pid, signal.SIGKILL)
        assert collector.done.wait(30) and collector.outputs[-1].error_code == "UNAVAILABLE"
    deadline = time.monotonic() + 30
    while loop.failure() is None:  # the receiver decides after failing the request
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "died 2 times within 60 s" in loop.failure() and loop.restarts == 1
    later = Collector()
    loop.submit(loop.make_request("after", "hi", SamplingParams(max_tokens=2)), later)
    assert later.done.wait(10) and "load the model again" in later.outputs[-1].error
    loop.stop(timeout=10)


def test_deltas_that_pile_up_for_a_slow_parent_join_without_loss():
    from pagedserve.engine.engine_process import _join_deltas

    prompt = [None, {5: -1.0}]  # prompt log-probabilities: in the first delta, kept by the join
    deltas = [
        (
            "a",
            False,
            None,
            [(0, [1], "x", -0.5, [{1: -0.5}], None), (1, [7], "p", -0.1, [{7: -0.1}], None)],
            prompt,
        ),
        ("b", False, None, [(0, [4], "q", -0.2, None, None)], None),
        ("a", False, None, [(0, [2, 3], "yz", -1.5, [{2: -0.4}, {3: -0.6}], None)], None),
        (
            "a",
            True,
            None,
            [(0, [], "", -1.5, [], "length"), (1, [8], "r", -0.3, [{8: -0.2}], "length")],
            None,
        ),
    ]
    joined = _join_deltas(deltas)
    assert [d[0] for d in joined] == ["a", "b"]
    request_id, finished, error, completions, prompt_logprobs = joined[0]
    assert finished and error is None and prompt_logprobs == prompt
    by_index = {c[0]: c for c in completions}
    assert by_index[0] == (0, [1, 2, 3], "xyz", -1.5, [{1: -0.5}, {2: -0.4}, {3: -0.6}], "length")
    assert by_index[1] == (1, [7, 8], "pr", -0.3, [{7: -0.1}, {8: -0.2}], "length")
    assert joined[1] == deltas[1]
