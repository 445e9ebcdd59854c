"""How the LLM model admits requests, with a stand-in engine: a long prompt is tokenized off the
admission path, and the ``max_waiting`` budget refuses requests beyond it with UNAVAILABLE."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.request import EngineRequest
from pagedserve.inference import InferenceRequest, InferenceResponse, Responder
from pagedserve_plugins.llm_backend import LLMModel

LONG = 100_000  # characters: tokenized on the model's tokenizer thread


class Answers(Responder):
    def __init__(self) -> None:
        self.responses: list[InferenceResponse] = []
        self.done = threading.Event()

    def send(self, response: InferenceResponse | None, final: bool) -> None:
        self.responses.append(response)
        if final:
            self.done.set()

    @property
    def cancelled(self) -> bool:
        return False

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    @property
    def error(self) -> grpc.StatusCode | None:
        error = self.responses[-1].error
        return None if error is None else error.code


class FakeLoop:
    """The engine driver's interface: a long prompt's tokenizing lasts until ``release`` is set;
    with ``hold``, submitted requests produce nothing until :meth:`answer`."""

    tokenizer = None

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.release = threading.Event()
        self.callbacks: dict[str, object] = {}

    def make_request(self, request_id: str, prompt: str, params, priority: int) -> EngineRequest:  # noqa: ANN001
        if len(prompt) >= LONG:
            self.release.wait(10)
        return EngineRequest(request_id, [1, 2, 3], params, priority)

    def submit(self, request: EngineRequest, callback) -> None:  # noqa: ANN001
        self.callbacks[request.request_id] = callback
        if not self.hold:
            self.answer(request.request_id)

    def answer(self, request_id: str) -> None:
        completion = CompletionOutput(0, "x", "x", [7], 1, finish_reason="length")
        self.callbacks[request_id](RequestOutput(request_id, [1, 2, 3], [completion], finished=True))

    def abort(self, request_id: str) -> None:
        pass

    def stop(self, timeout: float | None = None) -> None:
        pass


def _request(prompt: str = "hello") -> tuple[InferenceRequest, Answers]:
    answers = Answers()
    inputs = {"text_input": np.array([prompt.encode()], dtype=np.object_)}
    return InferenceRequest("tiny-llama", 1, inputs, ["text_output"], answers), answers


@pytest.fixture
def make_model():
    models = []

    def make(loop: FakeLoop, **limits: int) -> LLMModel:
        models.append(model := LLMModel(loop, **limits))
        return model

    yield make
    for model in models:
        model.finalize()


def test_a_long_prompt_does_not_hold_up_the_short_ones_behind_it(make_model):
    loop = FakeLoop()
    model = make_model(loop)
    long, long_answers = _request("x" * LONG)
    short, short_answers = _request()
    model.execute([long])  # was: tokenized right here, before the next request was looked at
    model.execute([short])
    assert short_answers.done.wait(10) and short_answers.error is None
    assert not long_answers.done.is_set()
    loop.release.set()
    assert long_answers.done.wait(10) and long_answers.error is None


def test_requests_over_the_waiting_budget_are_unavailable(make_model):
    loop = FakeLoop(hold=True)
    model = make_model(loop, max_waiting=2)
    (first, _), (second, _), (third, third_answers) = _request(), _request(), _request()
    model.execute([first, second, third])
    assert third_answers.error == grpc.StatusCode.UNAVAILABLE
    assert "Exceeds maximum queue size" in third_answers.responses[-1].error.message
    loop.answer(next(iter(loop.callbacks)))  # the first request's output: it no longer waits
    fourth, fourth_answers = _request()
    model.execute([fourth])
    assert not fourth_answers.done.is_set() and len(loop.callbacks) == 3


def test_a_prompt_over_max_prompt_bytes_is_refused_before_tokenizing(make_model):
    model = make_model(FakeLoop(), max_prompt_bytes=1000)
    request, answers = _request("é" * 501)  # 1002 bytes
    model.execute([request])
    assert answers.error == grpc.StatusCode.INVALID_ARGUMENT
    assert "1002 bytes; engine.max_prompt_bytes allows 1000" in answers.responses[-1].error.message
