"""The threaded engine loop: thread-safe submit/abort, callbacks, freeing blocks on abort."""

from __future__ import annotations

import threading
import time

import pytest
from pagedserve.engine.engine_loop import EngineLoop
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import assert_pool_free, engine_config


@pytest.fixture
def loop(tmp_path_factory):
    engine = LLMEngine(engine_config(ensure_tiny_llama(tmp_path_factory.mktemp("t") / "tiny"), block_size=8))
    loop = EngineLoop(engine)
    loop.start()
    yield loop
    loop.stop(timeout=10)
    assert_pool_free(engine.block_manager)


class Collector:
    def __init__(self) -> None:
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, output) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()


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
    deadline = time.time() + 5
    while loop.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert not loop.engine.has_unfinished_requests()


def test_duplicate_id_is_reported_through_the_callback(loop):
    first, second = Collector(), Collector()
    loop.submit(loop.make_request("same", "a", SamplingParams(max_tokens=50, ignore_eos=True)), first)
    loop.submit(loop.make_request("same", "b", SamplingParams(max_tokens=3)), second)
    assert second.done.wait(10) and "already in use" in second.outputs[-1].error
    assert first.done.wait(30)


def test_stop_aborts_running_requests(tmp_path_factory):
    engine = LLMEngine(engine_config(ensure_tiny_llama(tmp_path_factory.mktemp("t") / "tiny"), block_size=8))
    loop = EngineLoop(engine)
    loop.start()
    collector = Collector()
    loop.submit(loop.make_request("x", "hi", SamplingParams(max_tokens=1000, ignore_eos=True)), collector)
    loop.stop(timeout=10)
    assert collector.done.is_set() and collector.outputs[-1].outputs[0].finish_reason == "abort"
    assert_pool_free(engine.block_manager)
