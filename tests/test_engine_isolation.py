"""One request's failure stays its own: a step that raises fails only the request that caused it, and
a request that cannot run is refused before it costs anything. (An engine process that dies is
restarted: tests/test_engine_loop.py.)"""

from __future__ import annotations

import time

import pytest
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.engine_loop import EngineLoop
from pagedserve.engine.engine_process import EngineProcess
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import ENGINE_MODES, HAS_CUDA, engine_config
from .test_engine_loop import Collector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("t") / "tiny")


def _poisoned(kind: str) -> SamplingParams:
    """Parameters that pass validation and are then changed to what makes a step raise: the backstop
    for whatever validation may still miss."""
    params = SamplingParams(max_tokens=6, ignore_eos=True, min_tokens=2)
    if kind == "seed":
        params.seed = 2**64  # torch.Generator.manual_seed overflows
    else:
        params.stop_token_ids = [-1000000]  # an index far outside the logits
    return params


def _run(core: EngineCore) -> list:
    outputs = []
    for _ in range(1000):
        if not core.has_work():
            return outputs
        outputs += core.step()
    raise AssertionError("the engine made no progress")


# On CUDA the bad stop token id trips a device-side assert instead, which no process survives: see
# test_a_device_error_restarts_the_engine_process.
TINY_MODES = [m for m in ENGINE_MODES if m.id != "cuda-triton"]  # no Triton kernel for its head size
CASES = [pytest.param("seed", *m.values, marks=m.marks, id=f"seed-{m.id}") for m in TINY_MODES]
CASES.append(pytest.param("stop_token_ids", *ENGINE_MODES[0].values, id="stop_token_ids-cpu"))


@pytest.mark.parametrize(("poison", "mode"), CASES)
def test_a_failing_request_fails_alone_and_its_neighbours_finish(tiny, mode, poison):
    engine = LLMEngine(engine_config(tiny, block_size=8, **mode))
    core = EngineCore(engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    pair = SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = {
        "before": EngineRequest("before", [5, 6, 7, 8, 9], greedy),
        "after": EngineRequest("after", [9, 8, 7], greedy),
        "pair": EngineRequest("pair", [11, 12, 13, 14], pair),
    }
    expected = {rid: _alone(tiny, mode, request) for rid, request in requests.items()}
    core.add(requests["before"])
    core.step()  # "before" is decoding when the bad request arrives
    core.add(EngineRequest("bad", [3, 4, 5], _poisoned(poison)))
    core.add(requests["after"])
    core.add(requests["pair"])
    finals = {o.request_id: o for o in _run(core) if o.finished}
    bad = finals["bad"]
    assert bad.error_code == "INTERNAL" and "failed while serving this request" in bad.error
    for rid in requests:
        assert finals[rid].error is None, finals[rid].error
        assert [c.token_ids for c in finals[rid].outputs] == expected[rid]
    assert not engine.scheduler.has_unfinished() and engine.block_usage().num_used == 0


def _alone(tiny, mode: dict, request: EngineRequest) -> list[list[int]]:
    core = EngineCore(LLMEngine(engine_config(tiny, block_size=8, **mode)))
    core.add(request)
    [final] = [o for o in _run(core) if o.finished]
    return [c.token_ids for c in final.outputs]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_n_over_max_num_seqs_is_refused_before_anything_is_built(tiny, kind):
    config = engine_config(tiny, block_size=8, max_num_seqs=4)
    loop = EngineLoop(LLMEngine(config)) if kind == "thread" else EngineProcess(config)
    try:
        with pytest.raises(ValueError, match=r"sampling parameter n must be in \[1, 4\]"):
            loop.make_request("many", "hi", SamplingParams(n=10**9))
    finally:
        loop.stop(timeout=10)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_device_error_restarts_the_engine_process(tiny):
    """A device-side assert poisons the CUDA context of its process: the requests in it fail, and a
    new engine process serves the next ones."""
    loop = EngineProcess(engine_config(tiny, block_size=8, device="cuda", kernel="torch"))
    loop.start()
    try:
        bystander, bad = Collector(), Collector()
        loop.submit(
            loop.make_request("by", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True)), bystander
        )
        while not bystander.outputs:
            bystander.done.wait(0.01)
        loop.submit(EngineRequest("bad", [3, 4, 5], _poisoned("stop_token_ids")), bad)  # pickled unchecked
        assert bad.done.wait(60) and bystander.done.wait(60)
        assert "device failed" in bad.outputs[-1].error and "device failed" in bystander.outputs[-1].error
        for _ in range(1200):  # a request sent before the parent saw the child go fails with it
            if loop.restarts:
                break
            time.sleep(0.1)
        later = Collector()
        loop.submit(loop.make_request("later", [9, 8], SamplingParams(max_tokens=4, ignore_eos=True)), later)
        assert later.done.wait(120) and later.outputs[-1].error is None
        assert len(later.outputs[-1].outputs[0].token_ids) == 4 and loop.restarts == 1
    finally:
        loop.stop(timeout=10)


def test_a_device_failure_on_the_engine_thread_makes_the_model_unavailable(tiny, monkeypatch):
    """A thread driver cannot start a new CUDA context: it reports the failure (the model then shows
    UNAVAILABLE) and refuses what comes next instead of failing it step after step."""
    engine = LLMEngine(engine_config(tiny, block_size=8))

    def fail() -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(engine, "step", fail)
    monkeypatch.setattr(engine, "device_failed", lambda: True)
    loop = EngineLoop(engine)
    loop.start()
    try:
        first = Collector()
        loop.submit(loop.make_request("a", "hi", SamplingParams(max_tokens=4)), first)
        assert first.done.wait(30) and "device failed" in first.outputs[-1].error
        assert loop.failure() is not None and "load the model again" in loop.failure()
        later = Collector()
        loop.submit(loop.make_request("b", "hi", SamplingParams(max_tokens=4)), later)
        assert later.done.wait(30) and later.outputs[-1].error_code == "UNAVAILABLE"
    finally:
        loop.stop(timeout=10)
